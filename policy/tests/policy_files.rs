//! The policy language end to end, on real files in temp dirs: every key,
//! every default, every rejection, and drop-in merge order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_policy::*;

/// A temp dir with a module file and a data dir, and helpers to write
/// policy files into it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::write(dir.path().join("other.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::create_dir(dir.path().join("scratch")).unwrap();
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(&self, text: &str) -> Result<Policy, PolicyError> {
        let main = self.write("policy.toml", text);
        load(&main, &Environment::default())
    }

    fn ok(&self, text: &str) -> Policy {
        match self.load(text) {
            Ok(p) => p,
            Err(e) => panic!("expected a valid policy, got:\n{e}"),
        }
    }

    /// Load and return the rendered errors, asserting there were some.
    fn errors(&self, text: &str) -> Vec<String> {
        match self.load(text) {
            Ok(p) => panic!("expected errors, got a valid policy: {p:?}"),
            Err(e) => e.diagnostics().iter().map(ToString::to_string).collect(),
        }
    }
}

fn assert_one_error(errors: &[String], line_col: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&format!("policy.toml:{line_col}: ")) && e.contains(needle)),
        "no error at {line_col} containing {needle:?} in:\n{}",
        errors.join("\n")
    );
}

const MINIMAL: &str =
    "[apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:8080\"]\n";

#[test]
fn every_default() {
    let f = Fixture::new();
    let p = f.ok(MINIMAL);
    let d = &p.daemon;
    assert_eq!(d.cache_dir, Path::new("/var/cache/corral"));
    assert_eq!(d.state_dir, Path::new("/var/lib/corral"));
    assert_eq!(d.api_socket, Path::new("/run/corral/api.sock"));
    assert_eq!(d.api_group, "corral");
    assert_eq!(d.idle_exit, None);
    assert_eq!(d.metrics, None);
    assert_eq!(d.drain_timeout, Duration::from_secs(30));
    assert!(d.template);

    let app = &p.apps["web"];
    assert_eq!(app.name, "web");
    assert_eq!(app.module, f.path("app.wasm"));
    assert_eq!(app.kind, AppKind::Http);
    assert!(
        app.args.is_empty()
            && app.env.is_empty()
            && app.inherit_env.is_empty()
            && app.dirs.is_empty()
    );
    assert!(app.network.connect.is_empty());
    assert_eq!(app.pool, defaults::POOL);
    assert_eq!(
        (app.pool.min, app.pool.max, app.pool.concurrency),
        (0, 4, 16)
    );
    assert_eq!(app.pool.idle_timeout, Duration::from_secs(60));
    assert_eq!(app.pool.max_requests, None);
    assert_eq!(app.limits.memory, 128 << 20);
    assert_eq!(app.limits.timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        (app.limits.instances, app.limits.tables, app.limits.stdout),
        (1000, 1000, 1 << 20)
    );
    assert_eq!(app.sandbox.landlock, Enforcement::Require);
    assert_eq!(app.sandbox.seccomp, Enforcement::Require);
    assert_eq!(app.restart.on, RestartOn::Failure);
    assert_eq!(app.restart.backoff_min, Duration::from_millis(100));
    assert_eq!(app.restart.backoff_max, Duration::from_secs(30));
    let give_up = app.restart.give_up.unwrap();
    assert_eq!(
        (give_up.crashes, give_up.window),
        (5, Duration::from_secs(10))
    );
    assert_eq!(p.sources, vec![f.path("policy.toml")]);
}

#[test]
fn daemon_template_is_a_boolean() {
    let f = Fixture::new();
    let errors = f.errors(&format!("[daemon]\ntemplate = \"yes\"\n{MINIMAL}"));
    assert_one_error(
        &errors,
        "2:12",
        "daemon.template: expected true or false, found a string",
    );
}

#[test]
fn command_apps_have_no_default_timeout_and_need_no_listen() {
    let f = Fixture::new();
    let p = f.ok("[apps.job]\nmodule = \"app.wasm\"\nkind = \"command\"\n");
    assert_eq!(p.apps["job"].limits.timeout, None);
    assert!(p.apps["job"].listen.is_empty());
}

#[test]
fn systemd_directories_are_the_defaults_under_systemd() {
    let f = Fixture::new();
    let main = f.write("policy.toml", MINIMAL);
    let env = Environment {
        cache_directory: Some("/var/cache/x".into()),
        state_directory: Some("/var/lib/x".into()),
        runtime_directory: Some("/run/x".into()),
    };
    let p = load(&main, &env).unwrap();
    assert_eq!(p.daemon.cache_dir, Path::new("/var/cache/x"));
    assert_eq!(p.daemon.state_dir, Path::new("/var/lib/x"));
    assert_eq!(p.daemon.api_socket, Path::new("/run/x/api.sock"));
}

#[test]
fn every_key() {
    let f = Fixture::new();
    let text = r#"
[daemon]
cache-dir = "cache"
state-dir = "/srv/state"
api-socket = "/run/c/api.sock"
api-group = "wheel"
idle-exit = "10m"
metrics = "127.0.0.1:9464"
drain-timeout = "5s"
template = false

[defaults]
pool = { min = 0, max = 4, idle-timeout = "60s" }

[apps.hello]
module = "app.wasm"
kind = "http"
listen = ["127.0.0.1:8080", "[::1]:8080", "unix:/run/hello.sock", "systemd:hello"]
args = ["--verbose", "x"]
env = { GREETING = "hi", EMPTY = "" }
inherit-env = ["PATH", "TZ"]
dirs = [{ host = "data", guest = "/data", access = "ro" }, { host = "scratch", guest = "/tmp/./s/", access = "rw" }, { host = "data", guest = "/d2" }]
network = { connect = ["127.0.0.1:5432", "[::1]:6379", "api.example.com:443"] }
pool = { min = 1, max = 8, idle-timeout = "5m", concurrency = 64, max-requests = 100000 }
limits = { memory = "64MiB", timeout = "2s", instances = 10, tables = 5, stdout = 4096 }
sandbox = { landlock = "best-effort", seccomp = "require" }
restart = { on = "always", backoff = "50ms..10s", give-up = "10 in 60s" }
"#;
    let p = f.ok(text);
    let d = &p.daemon;
    assert_eq!(d.cache_dir, f.path("cache"));
    assert_eq!(d.state_dir, Path::new("/srv/state"));
    assert_eq!(d.api_socket, Path::new("/run/c/api.sock"));
    assert_eq!(d.api_group, "wheel");
    assert_eq!(d.idle_exit, Some(Duration::from_secs(600)));
    assert_eq!(d.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(d.drain_timeout, Duration::from_secs(5));
    assert!(!d.template);

    let a = &p.apps["hello"];
    assert_eq!(
        a.listen,
        vec![
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()),
            ListenAddr::Tcp("[::1]:8080".parse().unwrap()),
            ListenAddr::Unix("/run/hello.sock".into()),
            ListenAddr::Systemd("hello".into()),
        ]
    );
    assert_eq!(a.args, vec!["--verbose", "x"]);
    assert_eq!(a.env.get("GREETING").map(String::as_str), Some("hi"));
    assert_eq!(a.env.get("EMPTY").map(String::as_str), Some(""));
    assert_eq!(a.inherit_env, vec!["PATH", "TZ"]);
    assert_eq!(a.dirs.len(), 3);
    assert_eq!(
        (
            a.dirs[0].host.as_path(),
            a.dirs[0].guest.as_str(),
            a.dirs[0].access
        ),
        (f.path("data").as_path(), "/data", Access::ReadOnly)
    );
    assert_eq!(
        (a.dirs[1].guest.as_str(), a.dirs[1].access),
        ("/tmp/s", Access::ReadWrite)
    );
    assert_eq!(a.dirs[2].access, Access::ReadOnly, "access defaults to ro");
    let connect: Vec<String> = a.network.connect.iter().map(ToString::to_string).collect();
    assert_eq!(
        connect,
        vec!["127.0.0.1:5432", "[::1]:6379", "api.example.com:443"]
    );
    assert_eq!(
        (
            a.pool.min,
            a.pool.max,
            a.pool.idle_timeout,
            a.pool.concurrency,
            a.pool.max_requests
        ),
        (1, 8, Duration::from_secs(300), 64, Some(100_000))
    );
    assert_eq!(
        (
            a.limits.memory,
            a.limits.timeout,
            a.limits.instances,
            a.limits.tables,
            a.limits.stdout
        ),
        (64 << 20, Some(Duration::from_secs(2)), 10, 5, 4096)
    );
    assert_eq!(
        (a.sandbox.landlock, a.sandbox.seccomp),
        (Enforcement::BestEffort, Enforcement::Require)
    );
    assert_eq!(a.restart.on, RestartOn::Always);
    assert_eq!(
        (a.restart.backoff_min, a.restart.backoff_max),
        (Duration::from_millis(50), Duration::from_secs(10))
    );
    let g = a.restart.give_up.unwrap();
    assert_eq!((g.crashes, g.window), (10, Duration::from_secs(60)));
}

#[test]
fn off_and_unlimited_spellings() {
    let f = Fixture::new();
    let p = f.ok(&format!(
        "[daemon]\nidle-exit = \"off\"\nmetrics = \"off\"\n{MINIMAL}limits = {{ timeout = \"off\" }}\npool = {{ max-requests = \"unlimited\" }}\nrestart = {{ give-up = \"off\" }}\n"
    ));
    assert_eq!(p.daemon.idle_exit, None);
    assert_eq!(p.daemon.metrics, None);
    let a = &p.apps["web"];
    assert_eq!(a.limits.timeout, None);
    assert_eq!(a.pool.max_requests, None);
    assert_eq!(a.restart.give_up, None);
}

#[test]
fn defaults_are_inherited_and_overridden_key_by_key() {
    let f = Fixture::new();
    let p = f.ok(r#"
[defaults]
kind = "stdio"
pool = { max = 9, concurrency = 3 }
env = { A = "1", B = "2" }
sandbox = { landlock = "best-effort" }

[apps.one]
module = "app.wasm"
listen = ["127.0.0.1:9001"]
pool = { max = 2 }
env = { B = "two" }

[apps.two]
module = "other.wasm"
kind = "command"
"#);
    let one = &p.apps["one"];
    assert_eq!(one.kind, AppKind::Stdio, "kind comes from [defaults]");
    assert_eq!(
        (one.pool.max, one.pool.concurrency),
        (2, 3),
        "pool merges key by key"
    );
    assert_eq!(one.env.get("A").unwrap(), "1");
    assert_eq!(one.env.get("B").unwrap(), "two");
    assert_eq!(one.sandbox.landlock, Enforcement::BestEffort);
    assert_eq!(one.sandbox.seccomp, Enforcement::Require);
    let two = &p.apps["two"];
    assert_eq!(two.kind, AppKind::Command);
    assert_eq!(two.pool.max, 9);
}

#[test]
fn drop_ins_merge_in_name_order() {
    let f = Fixture::new();
    let main = f.write(
        "policy.toml",
        &format!("{MINIMAL}pool = {{ max = 4, min = 1 }}\nargs = [\"a\", \"b\"]\n"),
    );
    // Written out of order on purpose: the name decides, not creation time.
    f.write(
        "policy.d/20-later.toml",
        "[apps.web]\npool = { max = 20 }\n",
    );
    f.write("policy.d/10-first.toml", "[apps.web]\npool = { max = 10, idle-timeout = \"1s\" }\nargs = [\"c\"]\n[apps.extra]\nmodule = \"../other.wasm\"\nkind = \"command\"\n");
    f.write("policy.d/README", "not toml, ignored");
    f.write("policy.d/.hidden.toml", "this is not valid toml =");
    let p = load(&main, &Environment::default()).unwrap();
    let web = &p.apps["web"];
    assert_eq!(web.pool.max, 20, "20-later.toml wins over 10-first.toml");
    assert_eq!(web.pool.min, 1, "keys a drop-in does not set are kept");
    assert_eq!(web.pool.idle_timeout, Duration::from_secs(1));
    assert_eq!(web.args, vec!["c"], "arrays are replaced whole");
    assert_eq!(
        p.apps["extra"].module,
        f.path("other.wasm"),
        "paths resolve against the drop-in's own directory"
    );
    assert_eq!(
        p.sources,
        vec![
            main.clone(),
            f.path("policy.d/10-first.toml"),
            f.path("policy.d/20-later.toml")
        ]
    );
    assert_eq!(drop_in_files(&main).unwrap().len(), 2);
}

#[test]
fn errors_in_drop_ins_name_the_drop_in() {
    let f = Fixture::new();
    let main = f.write("policy.toml", MINIMAL);
    f.write(
        "policy.d/20-web.toml",
        "# web overrides\n\n[apps.web]\npool = { min = 1, max = 0 }\n",
    );
    let err = load(&main, &Environment::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "policy.d/20-web.toml:4:25: apps.web.pool.max: 0 is too small: must be at least 1"
        ),
        "{err}"
    );
}

#[test]
fn three_mistakes_three_errors_with_lines() {
    let f = Fixture::new();
    let errors = f.errors(
        r#"[apps.web]
module = "app.wasm"
kind = "http"
listen = ["127.0.0.1:8080"]
pool = { min = 2, max = 1 }
limits = { memory = "lots" }
sandbox = { landlok = "require" }
"#,
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_one_error(
        &errors,
        "5:25",
        "apps.web.pool.max: 1 is below pool.min (2)",
    );
    assert_one_error(
        &errors,
        "6:21",
        "apps.web.limits.memory: `lots` is not a size",
    );
    assert_one_error(
        &errors,
        "7:13",
        "apps.web.sandbox.landlok: unknown key; did you mean `landlock`?",
    );
}

#[test]
fn unknown_keys_everywhere() {
    let f = Fixture::new();
    let errors = f.errors(&format!(
        "[daemon]\ncache_dir = \"x\"\n[defaults]\nmodel = \"x\"\n[extra]\n{MINIMAL}network = {{ conect = [] }}\nrestart = {{ backof = \"1s..2s\" }}\nlimits = {{ mem = 1 }}\npool = {{ maxx = 1 }}\ndirs = [{{ host = \"data\", guest = \"/d\", mode = \"ro\" }}]\n"
    ));
    for key in [
        "daemon.cache_dir",
        "defaults.model",
        "extra",
        "apps.web.network.conect",
        "apps.web.restart.backof",
        "apps.web.limits.mem",
        "apps.web.pool.maxx",
        "apps.web.dirs[0].mode",
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!(": {key}: unknown key"))),
            "{key} not reported in {errors:#?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("did you mean `cache-dir`"))
    );
}

#[test]
fn wrong_types() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.web]\nmodule = 5\nkind = true\nlisten = \"127.0.0.1:1\"\nargs = [1]\nenv = { N = 1 }\npool = { max = \"4\" }\nlimits = 3\n",
    );
    for (at, needle) in [
        (
            "2:10",
            "apps.web.module: expected a string, found an integer",
        ),
        ("3:8", "apps.web.kind: expected a string, found a boolean"),
        ("4:10", "apps.web.listen: expected an array, found a string"),
        (
            "5:9",
            "apps.web.args[0]: expected a string, found an integer",
        ),
        (
            "6:13",
            "apps.web.env.N: expected a string, found an integer",
        ),
        (
            "7:16",
            "apps.web.pool.max: expected an integer, found a string",
        ),
        (
            "8:10",
            "apps.web.limits: expected a table, found an integer",
        ),
    ] {
        assert_one_error(&errors, at, needle);
    }
}

#[test]
fn bad_sizes_and_durations() {
    let f = Fixture::new();
    let errors = f.errors(&format!(
        "{MINIMAL}limits = {{ memory = \"12 parsecs\", timeout = \"soon\", stdout = -1 }}\npool = {{ idle-timeout = \"5 minutes-ish\" }}\nrestart = {{ backoff = \"10s..1s\", give-up = \"many in 1s\" }}\n[daemon]\nidle-exit = \"never\"\n"
    ));
    for needle in [
        "limits.memory: `12 parsecs` is not a size",
        "limits.timeout: `soon` is not a duration",
        "limits.stdout: -1 is negative",
        "pool.idle-timeout: `5 minutes-ish` is not a duration",
        "restart.backoff: `10s..1s`: the maximum is below the minimum",
        "restart.give-up: `many in 1s`",
        "daemon.idle-exit: `never` is not a duration",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle} not in {errors:#?}"
        );
    }
    let errors = f.errors(&format!(
        "{MINIMAL}limits = {{ memory = 1000, timeout = \"0s\" }}\n"
    ));
    assert!(
        errors.iter().any(|e| e.contains("less than one Wasm page")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("0s would stop every request")),
        "{errors:#?}"
    );
}

/// A size with a unit is bounded as the same number of bytes written as
/// an integer is: "9999999PiB" used to saturate to 2^64-1 and pass.
#[test]
fn sizes_too_large_are_refused_not_saturated() {
    let f = Fixture::new();
    let errors = f.errors(&format!(
        "{MINIMAL}limits = {{ memory = \"9999999PiB\", stdout = \"16EiB\" }}\n"
    ));
    for needle in [
        "limits.memory: `9999999PiB` is too large",
        "limits.stdout: `16EiB` is too large",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle} not in {errors:#?}"
        );
    }
    // The integer form of the same number is refused too (by TOML).
    let errors = f.errors(&format!(
        "{MINIMAL}limits = {{ memory = 11258987790745600000000 }}\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn duplicate_listen_addresses_across_apps() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.a]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:8080\"]\n[apps.b]\nmodule = \"app.wasm\"\nkind = \"stdio\"\nlisten = [\"127.0.0.1:8080\"]\n[apps.c]\nmodule = \"app.wasm\"\nkind = \"stdio\"\nlisten = [\"0.0.0.0:8080\"]\n",
    );
    assert_one_error(
        &errors,
        "8:11",
        "apps.b.listen[0]: `127.0.0.1:8080` is already used by app `a`",
    );
    assert_one_error(
        &errors,
        "12:11",
        "apps.c.listen[0]: `0.0.0.0:8080` overlaps",
    );
    let errors = f.errors("[apps.a]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]\n");
    assert_one_error(&errors, "4:29", "listed twice");
}

#[test]
fn one_systemd_socket_for_two_apps() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.a]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\"]\n[apps.b]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\"]\n",
    );
    assert_one_error(
        &errors,
        "8:11",
        "systemd socket `web` is already used by app `a`",
    );
}

/// `[sockets.NAME]` gives systemd the address of an app's `systemd:NAME`
/// socket (corral-generator writes it as corral-NAME.socket).
#[test]
fn sockets_name_the_address_of_systemd_sockets() {
    let f = Fixture::new();
    let p = f.ok(
        "[sockets.web]\nlisten = \"127.0.0.1:8080\"\n[sockets.admin]\nlisten = \"unix:/run/admin.sock\"\n\
         [apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\", \"systemd:admin\"]\n",
    );
    assert_eq!(p.sockets.len(), 2);
    assert_eq!(
        p.sockets["web"].listen,
        ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(
        p.sockets["admin"].listen,
        ListenAddr::Unix("/run/admin.sock".into())
    );
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["sockets"]["web"]["listen"], "127.0.0.1:8080");
    // A systemd:NAME without [sockets.NAME] is still valid: the operator
    // writes that socket unit by hand.
    assert!(f.ok(MINIMAL).sockets.is_empty());
}

#[test]
fn sockets_mistakes() {
    let f = Fixture::new();
    let app = "[apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\", \"127.0.0.1:9090\"]\n";
    // Not used by any app, a systemd: address, a missing and a bad address,
    // an unknown key, a bad name, an address an app binds itself.
    let errors = f.errors(&format!(
        "{app}[sockets.wbe]\nlisten = \"127.0.0.1:8080\"\n\
         [sockets.web]\nlisten = \"systemd:web\"\n\
         [sockets.x]\nlistn = \"127.0.0.1:1\"\n\
         [sockets.\"a b\"]\nlisten = \"127.0.0.1:2\"\n\
         [sockets.y]\nlisten = \"0.0.0.0:9090\"\n"
    ));
    assert_one_error(
        &errors,
        "5:10",
        "sockets.wbe: no app listens on \"systemd:wbe\"",
    );
    assert_one_error(
        &errors,
        "8:10",
        "sockets.web.listen: `systemd:web`: a socket's address is",
    );
    assert_one_error(
        &errors,
        "10:1",
        "sockets.x.listn: unknown key; did you mean `listen`?",
    );
    assert_one_error(&errors, "9:10", "sockets.x.listen: missing");
    assert_one_error(
        &errors,
        "11:10",
        "sockets.a b: `a b` is not a valid socket name",
    );
    assert_one_error(
        &errors,
        "14:10",
        "sockets.y.listen: `0.0.0.0:9090` overlaps `127.0.0.1:9090` of app `web`",
    );
    let errors = f.errors(&format!("{app}[sockets.web]\nlisten = \"127.0.0.1:0\"\n"));
    assert_one_error(&errors, "6:10", "sockets.web.listen: `127.0.0.1:0`: port 0");
}

/// An app with another mistake still counts as using its socket: one
/// error, about the app, not a second one about the socket.
#[test]
fn a_broken_app_still_uses_its_socket() {
    let f = Fixture::new();
    let errors = f.errors(
        "[sockets.web]\nlisten = \"127.0.0.1:8080\"\n[apps.web]\nmodule = \"absent.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\"]\n",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_one_error(&errors, "4:10", "apps.web.module");
}

/// corral-generator reads only `[sockets]`: a missing module (say, on a
/// /var not yet mounted at early boot) does not hide the sockets, but a
/// mistake in `[sockets]` or a syntax error anywhere is still an error.
#[test]
fn load_sockets_reads_only_the_sockets() {
    let f = Fixture::new();
    let main = f.write(
        "policy.toml",
        "[sockets.web]\nlisten = \"[::1]:8080\"\n[apps.web]\nmodule = \"/nonexistent/app.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\"]\n",
    );
    f.write(
        "policy.d/10-more.toml",
        "[sockets.echo]\nlisten = \"unix:/run/echo.sock\"\n",
    );
    assert!(load(&main, &Environment::default()).is_err());
    let sockets = load_sockets(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sockets.keys().collect::<Vec<_>>(), ["echo", "web"]);
    assert_eq!(sockets["web"].listen.to_string(), "[::1]:8080");

    f.write(
        "policy.d/20-bad.toml",
        "[sockets.x]\nlisten = \"nowhere\"\n",
    );
    let err = load_sockets(&main).unwrap_err().to_string();
    assert!(err.contains("20-bad.toml:2:10: sockets.x.listen:"), "{err}");
    f.write("policy.d/20-bad.toml", "[apps.x\n");
    assert!(matches!(load_sockets(&main), Err(PolicyError::Invalid(_))));
}

#[test]
fn guest_paths_must_be_absolute_and_stay_inside() {
    let f = Fixture::new();
    let errors = f.errors(&format!(
        "{MINIMAL}dirs = [{{ host = \"data\", guest = \"data\" }}, {{ host = \"data\", guest = \"/a/../../etc\" }}, {{ host = \"data\", guest = \"/x\" }}, {{ host = \"scratch\", guest = \"/x/\" }}]\n"
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("dirs[0].guest: `data` is relative")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("dirs[1].guest: `/a/../../etc` contains `..`")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("dirs[3].guest: `/x` is granted twice")),
        "{errors:#?}"
    );
}

#[test]
fn host_dirs_and_modules_must_exist() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.web]\nmodule = \"missing.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:1\"]\ndirs = [{ host = \"nowhere\", guest = \"/n\" }, { host = \"app.wasm\", guest = \"/f\" }]\n",
    );
    assert_one_error(
        &errors,
        "2:10",
        "apps.web.module: `missing.wasm` does not exist",
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("dirs[0].host: `nowhere` does not exist")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("dirs[1].host: `app.wasm` is not a directory")),
        "{errors:#?}"
    );
    let errors = f.errors("[apps.web]\nmodule = \"data\"\nkind = \"command\"\n");
    assert_one_error(&errors, "2:10", "`data` is not a file");
}

#[test]
fn min_above_max_and_zero_max() {
    let f = Fixture::new();
    let errors = f.errors(&format!("{MINIMAL}pool = {{ min = 1, max = 0 }}\n"));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("apps.web.pool.max: 0 is too small: must be at least 1"));
    let errors = f.errors(&format!("{MINIMAL}pool = {{ min = 5 }}\n"));
    assert!(
        errors[0].contains("apps.web.pool.min: 5 is above pool.max (4, the default)"),
        "{errors:#?}"
    );
    let errors = f.errors(&format!(
        "{MINIMAL}pool = {{ concurrency = 0, max-requests = 0 }}\n"
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("pool.concurrency: 0 is too small")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("pool.max-requests: 0 is too small")),
        "{errors:#?}"
    );
}

#[test]
fn unknown_kind_and_enum_values() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.web]\nmodule = \"app.wasm\"\nkind = \"grpc\"\nsandbox = { seccomp = \"maybe\" }\nrestart = { on = \"sometimes\" }\ndirs = [{ host = \"data\", guest = \"/d\", access = \"wo\" }]\n",
    );
    assert_one_error(
        &errors,
        "3:8",
        "apps.web.kind: `grpc` is not allowed: use one of \"http\", \"stdio\", \"command\"",
    );
    assert!(errors.iter().any(|e| e.contains(
        "sandbox.seccomp: `maybe` is not allowed: use one of \"require\", \"best-effort\""
    )));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("restart.on: `sometimes` is not allowed"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("access: `wo` is not allowed: use one of \"ro\", \"rw\""))
    );
}

#[test]
fn http_and_stdio_apps_need_a_listen_address() {
    let f = Fixture::new();
    for kind in ["http", "stdio"] {
        let errors = f.errors(&format!(
            "[apps.web]\nmodule = \"app.wasm\"\nkind = \"{kind}\"\n"
        ));
        assert!(
            errors.iter().any(|e| e.contains("apps.web.listen: an ")
                && e.contains("needs at least one listen address")),
            "{errors:#?}"
        );
    }
    let errors = f.errors("[apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = []\n");
    assert_one_error(&errors, "4:10", "needs at least one listen address");
}

#[test]
fn missing_module_and_kind_point_at_the_app() {
    let f = Fixture::new();
    let errors = f.errors("\n[apps.web]\nlisten = [\"127.0.0.1:1\"]\n");
    assert_one_error(&errors, "2:7", "apps.web.module: missing");
    assert_one_error(&errors, "2:7", "apps.web.kind: missing");
}

#[test]
fn bad_listen_connect_names_and_env() {
    let f = Fixture::new();
    let errors = f.errors(
        "[apps.\"bad name\"]\nkind = \"command\"\n[apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"localhost:80\"]\nnetwork = { connect = [\"db\"] }\nenv = { \"A=B\" = \"x\" }\ninherit-env = [\"\"]\n[daemon]\napi-group = \"-x\"\nmetrics = \"here\"\n",
    );
    for needle in [
        "apps.bad name: `bad name` is not a valid app name",
        "apps.web.listen[0]: `localhost:80` is not a listen address",
        "apps.web.network.connect[0]: `db` is not a connect target",
        "apps.web.env.A=B: not a valid environment variable name",
        "apps.web.inherit-env",
        "daemon.api-group: `-x` is not a valid group name",
        "daemon.metrics: `here` is not an address",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle} not in {errors:#?}"
        );
    }
}

#[test]
fn a_mistake_in_defaults_is_reported_once_at_its_line() {
    let f = Fixture::new();
    let errors = f.errors(&format!(
        "[defaults]\npool = {{ max = 0 }}\n{MINIMAL}[apps.b]\nmodule = \"app.wasm\"\nkind = \"command\"\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_one_error(&errors, "2:16", "defaults.pool.max: 0 is too small");
}

#[test]
fn syntax_errors_are_all_reported() {
    let f = Fixture::new();
    let errors = f.errors("[apps.web]\nmodule = \nkind = \"http\n");
    assert!(errors.len() >= 2, "{errors:#?}");
    assert!(
        errors.iter().all(|e| e.contains("policy.toml:")),
        "{errors:#?}"
    );
    let errors = f.errors("[apps.web]\nkind = \"http\"\nkind = \"stdio\"\n");
    assert!(
        errors.iter().any(|e| e.contains("policy.toml:3:")),
        "duplicate key: {errors:#?}"
    );
}

#[test]
fn unreadable_files_say_which() {
    let f = Fixture::new();
    let err = load(&f.path("absent.toml"), &Environment::default()).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }));
    assert!(
        err.to_string()
            .contains("absent.toml: cannot read the policy file"),
        "{err}"
    );
}

#[test]
fn json_form_mirrors_the_file() {
    let f = Fixture::new();
    let p = f.ok(&format!("{MINIMAL}limits = {{ timeout = \"off\" }}\n"));
    let json = serde_json::to_value(&p).unwrap();
    let app = &json["apps"]["web"];
    assert_eq!(app["kind"], "http");
    assert_eq!(app["listen"][0], "127.0.0.1:8080");
    assert_eq!(app["limits"]["timeout"], "off");
    assert_eq!(app["pool"]["idle-timeout"], "1m");
    assert_eq!(app["sandbox"]["landlock"], "require");
    assert_eq!(json["daemon"]["metrics"], serde_json::Value::Null);
}

#[test]
fn the_example_policy_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.toml");
    let p = load(&example, &Environment::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.apps.is_empty());
}

#[test]
fn the_reference_states_the_defaults() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.md"))
            .unwrap();
    // Every key is checked against the validator's own key lists by the
    // unit test `validate::tests::every_key_is_in_the_reference`; here the
    // defaults.
    for default in [
        "`\"/var/cache/corral\"`",
        "`\"60s\"`",
        "`\"128MiB\"`",
        "`\"100ms..30s\"`",
        "`\"5 in 10s\"`",
        "`16`",
        "`\"1MiB\"`",
    ] {
        assert!(
            doc.contains(default),
            "docs/policy.md does not state the default {default}"
        );
    }
}

/// `tls = { cert, key, client-ca }`: the files resolved against the policy's
/// directory, where each was written kept for later errors; a key others
/// may read, missing files and misfits refused at their line.
#[test]
fn tls_names_its_files_and_keeps_the_key_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fixture::new();
    f.write("tls/web.crt", "not read by the policy");
    let key = f.write("tls/web.key", "not read by the policy");
    f.write("tls/ca.crt", "not read by the policy");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = f.ok(&format!(
        "{MINIMAL}tls = {{ cert = \"tls/web.crt\", key = \"tls/web.key\", client-ca = \"tls/ca.crt\" }}\n"
    ));
    let tls = p.apps["web"].tls.as_ref().expect("tls");
    assert_eq!(tls.cert, f.path("tls/web.crt"));
    assert_eq!(tls.key, f.path("tls/web.key"));
    assert_eq!(
        tls.client_ca.as_deref(),
        Some(f.path("tls/ca.crt").as_path())
    );
    assert!(tls.cert_at.ends_with("policy.toml:5:16"), "{}", tls.cert_at);
    assert!(tls.key_at.ends_with("policy.toml:5:37"), "{}", tls.key_at);
    assert!(f.ok(MINIMAL).apps["web"].tls.is_none());

    // Readable by others: refused, naming the mode and the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let errors = f.errors(&format!(
        "{MINIMAL}tls = {{ cert = \"tls/web.crt\", key = \"tls/web.key\" }}\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_one_error(
        &errors,
        "5:37",
        "apps.web.tls.key: `tls/web.key` is readable by every user (mode 0644)",
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();

    let errors = f.errors(&format!(
        "{MINIMAL}tls = {{ cert = \"tls/nope.crt\", kye = \"tls/web.key\" }}\n"
    ));
    assert_one_error(
        &errors,
        "5:16",
        "apps.web.tls.cert: `tls/nope.crt` does not exist",
    );
    assert_one_error(
        &errors,
        "5:7",
        "apps.web.tls.key: missing: the PEM private key",
    );
    assert_one_error(
        &errors,
        "5:32",
        "apps.web.tls.kye: unknown key; did you mean `key`?",
    );

    // Misfits: a command app, only unix sockets, a key the guest could read.
    let tls = "tls = { cert = \"tls/web.crt\", key = \"tls/web.key\" }";
    let errors = f.errors(&format!(
        "[apps.job]\nmodule = \"app.wasm\"\nkind = \"command\"\n{tls}\n"
    ));
    assert_one_error(
        &errors,
        "4:7",
        "apps.job.tls: a command app accepts no connections",
    );
    let errors = f.errors(&format!(
        "[apps.web]\nmodule = \"app.wasm\"\nkind = \"http\"\nlisten = [\"unix:/run/web.sock\"]\n{tls}\n"
    ));
    assert_one_error(&errors, "5:7", "apps.web.tls: tls applies to TCP addresses");
    let errors = f.errors(&format!(
        "{MINIMAL}dirs = [{{ host = \"tls\", guest = \"/etc/tls\" }}]\n{tls}\n"
    ));
    assert_one_error(&errors, "6:7", "the guest could read it");
}
