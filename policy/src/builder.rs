//! A one-app [`AppSpec`] built in code rather than read from a policy file:
//! what `corral run` and the containerd shim's task process hand to the
//! sandbox and the host. [`AppSpecBuilder::build`] applies the policy's
//! defaults (`crate::defaults`) and its checks (the same functions the
//! policy file's validator calls, so the two cannot disagree), and names
//! the key of every problem as a policy file would (`apps.NAME.limits.memory`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::defaults;
use crate::parse::clean_path;
use crate::spec::*;
use crate::validate::app::{
    check_app_name, check_env_name, check_env_value, check_inherit_env, check_listen_for_kind,
    check_module, granted_twice, listed_twice,
};
use crate::validate::tables::check_limits;

/// Builds one app's [`AppSpec`]; see [`AppSpec::builder`].
///
/// Setters only record; [`AppSpecBuilder::build`] checks everything at once
/// and reports every problem. What is not set is the policy's default:
/// `limits` by kind, `pool`, `restart`, and `sandbox` (both layers
/// `require`).
#[derive(Debug, Clone)]
#[must_use]
pub struct AppSpecBuilder {
    name: String,
    module: PathBuf,
    kind: AppKind,
    listen: Vec<ListenAddr>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    inherit_env: Vec<String>,
    dirs: Vec<DirGrant>,
    connect: Vec<ConnectTarget>,
    limits: Limits,
    sandbox: SandboxSpec,
    reuse: Option<Reuse>,
}

impl AppSpec {
    /// Start an app named `name` (the rules of a policy's app names) running
    /// `module` (a relative path is taken from the current directory) as
    /// `kind`.
    ///
    /// ```
    /// use corral_policy::{AppKind, AppSpec, Enforcement, ListenAddr};
    /// let module = std::env::temp_dir().join("corral-doc-builder.wat");
    /// std::fs::write(&module, "(module)").unwrap();
    /// let app = AppSpec::builder("run", &module, AppKind::Http)
    ///     .listen(ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()))
    ///     .env("GREETING", "hello")
    ///     .sandbox(Enforcement::BestEffort)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(app.limits.memory, 128 << 20); // the policy's default
    ///
    /// let err = AppSpec::builder("run", &module, AppKind::Http).build().unwrap_err();
    /// assert!(err.to_string().starts_with("apps.run.listen: an http app needs"));
    /// ```
    pub fn builder(
        name: impl Into<String>,
        module: impl Into<PathBuf>,
        kind: AppKind,
    ) -> AppSpecBuilder {
        AppSpecBuilder {
            name: name.into(),
            module: module.into(),
            kind,
            listen: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: Vec::new(),
            dirs: Vec::new(),
            connect: Vec::new(),
            limits: defaults::limits(kind),
            sandbox: defaults::SANDBOX,
            reuse: None,
        }
    }
}

impl AppSpecBuilder {
    /// Add a listen address (`listen`).
    pub fn listen(mut self, addr: ListenAddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Add a guest argument after argv\[0\] (`args`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Set a guest environment variable (`env`); a later value for the
    /// same name replaces the earlier one.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.env.retain(|(n, _)| *n != name);
        self.env.push((name, value.into()));
        self
    }

    /// Pass the host's variable `name` through (`inherit-env`).
    pub fn inherit_env(mut self, name: impl Into<String>) -> Self {
        self.inherit_env.push(name.into());
        self
    }

    /// Grant a directory (`dirs`); [`DirGrant::new`] checks the grant itself.
    pub fn dir(mut self, grant: DirGrant) -> Self {
        self.dirs.push(grant);
        self
    }

    /// Allow outbound connections to `target` (`network.connect`); parse
    /// one with `"db.internal:5432".parse::<ConnectTarget>()`.
    pub fn connect(mut self, target: ConnectTarget) -> Self {
        self.connect.push(target);
        self
    }

    /// `limits.memory`, in bytes (at least one Wasm page).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.limits.memory = bytes;
        self
    }

    /// `limits.timeout`; `None` is `"off"`.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.limits.timeout = timeout;
        self
    }

    /// `limits.instances`.
    pub fn instances(mut self, n: u32) -> Self {
        self.limits.instances = n;
        self
    }

    /// `limits.tables`.
    pub fn tables(mut self, n: u32) -> Self {
        self.limits.tables = n;
        self
    }

    /// `pool.reuse` (http apps with a WASI 0.3 handler only).
    pub fn reuse(mut self, reuse: Reuse) -> Self {
        self.reuse = Some(reuse);
        self
    }

    /// `limits.stdout`, in bytes.
    pub fn stdout(mut self, bytes: u64) -> Self {
        self.limits.stdout = bytes;
        self
    }

    /// Both sandbox layers (`sandbox.landlock` and `sandbox.seccomp`).
    pub fn sandbox(mut self, enforcement: Enforcement) -> Self {
        self.sandbox.landlock = enforcement;
        self.sandbox.seccomp = enforcement;
        self
    }

    /// `sandbox.landlock` alone.
    pub fn landlock(mut self, enforcement: Enforcement) -> Self {
        self.sandbox.landlock = enforcement;
        self
    }

    /// `sandbox.seccomp` alone.
    pub fn seccomp(mut self, enforcement: Enforcement) -> Self {
        self.sandbox.seccomp = enforcement;
        self
    }

    /// Check everything as a policy file's app would be checked and return
    /// the spec, or every problem with its key.
    pub fn build(self) -> Result<AppSpec, AppSpecError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(FieldError { key, message });
        if let Err(why) = check_app_name(&self.name) {
            problem(String::new(), why);
        }

        let written = self.module.display().to_string();
        let resolved = std::path::absolute(&self.module)
            .map(|p| clean_path(&p))
            .unwrap_or_else(|_| self.module.clone());
        let module = check_module(&written, resolved)
            .map_err(|why| problem("module".into(), why))
            .ok();

        let mut listen: Vec<ListenAddr> = Vec::new();
        for (i, addr) in self.listen.into_iter().enumerate() {
            let text = addr.to_string();
            if let Err(why) = crate::addr::check_listen(&addr, &text) {
                problem(format!("listen[{i}]"), why);
            } else if listen.contains(&addr) {
                problem(format!("listen[{i}]"), listed_twice(&text));
            } else {
                listen.push(addr);
            }
        }
        if let Err(why) = check_listen_for_kind(self.kind, &listen) {
            problem("listen".into(), why);
        }

        let mut env = BTreeMap::new();
        for (name, value) in self.env {
            let check = check_env_name(&name).and_then(|()| check_env_value(&value));
            match check {
                Ok(()) => {
                    env.insert(name, value);
                }
                Err(why) => problem(format!("env.{name}"), why),
            }
        }
        if let Err(why) = check_inherit_env(&self.inherit_env) {
            problem("inherit-env".into(), why);
        }

        let mut dirs: Vec<DirGrant> = Vec::new();
        for (i, grant) in self.dirs.into_iter().enumerate() {
            if dirs.iter().any(|d| d.guest == grant.guest) {
                problem(format!("dirs[{i}].guest"), granted_twice(&grant.guest));
            } else {
                dirs.push(grant);
            }
        }

        for (key, why) in check_limits(&self.limits) {
            problem(format!("limits.{key}"), why);
        }
        if let Some(reuse) = self.reuse {
            if self.kind != AppKind::Http {
                problem(
                    "pool.reuse".into(),
                    format!(
                        "kind = \"{}\" has no requests to reuse an instance for: pool.reuse applies to http apps",
                        self.kind
                    ),
                );
            }
            if reuse.requests == 0 || reuse.concurrent == 0 {
                problem(
                    "pool.reuse".into(),
                    "requests and concurrent must each be at least 1".into(),
                );
            }
        }

        if !problems.is_empty() {
            let app = self.name;
            for p in &mut problems {
                p.key = if p.key.is_empty() {
                    format!("apps.{app}")
                } else {
                    format!("apps.{app}.{}", p.key)
                };
            }
            return Err(AppSpecError { app, problems });
        }
        Ok(AppSpec {
            name: self.name,
            module: module.expect("no problems, so the module was found"),
            oci: None,
            kind: self.kind,
            listen,
            args: self.args,
            env,
            inherit_env: self.inherit_env,
            dirs,
            network: NetworkSpec {
                connect: self.connect,
            },
            pool: PoolSpec {
                reuse: self.reuse,
                ..defaults::POOL
            },
            limits: self.limits,
            sandbox: self.sandbox,
            restart: defaults::RESTART,
        })
    }
}

/// Why [`AppSpecBuilder::build`] refused: every problem, each with its key.
/// Displays one line per problem, `apps.NAME.KEY: message`, as
/// `corral check` words a policy file's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct AppSpecError {
    /// The app's name, as given.
    pub app: String,
    pub problems: Vec<FieldError>,
}

/// One problem of an app built in code.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FieldError {
    /// The policy key path, e.g. `apps.run.limits.memory` (`apps.run` for
    /// the name itself).
    pub key: String,
    /// What is wrong and what is allowed (the policy file's wording).
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl fmt::Display for AppSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(dir: &std::path::Path) -> PathBuf {
        let m = dir.join("app.wat");
        std::fs::write(&m, "(module)").unwrap();
        m
    }

    fn tcp(text: &str) -> ListenAddr {
        ListenAddr::Tcp(text.parse().unwrap())
    }

    /// The builder and a policy file saying the same thing give the same
    /// spec: same defaults, same normalization.
    #[test]
    fn same_spec_as_the_policy_file() {
        let tmp = tempfile::tempdir().unwrap();
        let m = module(tmp.path());
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let text = format!(
            r#"
[apps.web]
module = {m:?}
kind = "http"
listen = ["127.0.0.1:8080"]
args = ["-v"]
env = {{ A = "1" }}
inherit-env = ["HOME"]
dirs = [{{ host = {data:?}, guest = "/data//x/", access = "rw" }}]
network = {{ connect = ["db.internal:5432"] }}
limits = {{ memory = "64MiB", timeout = "5s", tables = 3 }}
sandbox = {{ landlock = "best-effort" }}
"#,
            m = m.display().to_string(),
            data = data.display().to_string(),
        );
        let policy = crate::parse_str(
            &text,
            &tmp.path().join("policy.toml"),
            &crate::Environment::default(),
        )
        .unwrap();
        let built = AppSpec::builder("web", &m, AppKind::Http)
            .listen(tcp("127.0.0.1:8080"))
            .arg("-v")
            .env("A", "1")
            .inherit_env("HOME")
            .dir(DirGrant::new(data, "/data//x/", Access::ReadWrite).unwrap())
            .connect("db.internal:5432".parse().unwrap())
            .memory(64 << 20)
            .timeout(Some(Duration::from_secs(5)))
            .tables(3)
            .landlock(Enforcement::BestEffort)
            .build()
            .unwrap();
        assert_eq!(built, policy.apps["web"]);

        // Defaults by kind, as in a policy file.
        let text = format!(
            "[apps.job]\nmodule = {:?}\nkind = \"command\"\n",
            m.display().to_string()
        );
        let policy = crate::parse_str(
            &text,
            &tmp.path().join("policy.toml"),
            &crate::Environment::default(),
        )
        .unwrap();
        let built = AppSpec::builder("job", &m, AppKind::Command)
            .build()
            .unwrap();
        assert_eq!(built, policy.apps["job"]);
        assert_eq!(built.limits.timeout, None);
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let err = AppSpec::builder("bad name", tmp.path().join("missing.wasm"), AppKind::Http)
            .listen(tcp("127.0.0.1:0"))
            .listen(ListenAddr::Unix("relative.sock".into()))
            .env("A=B", "1")
            .env("C", "nul\0")
            .inherit_env("")
            .memory(1000)
            .timeout(Some(Duration::ZERO))
            .instances(0)
            .tables(2_000_000)
            .build()
            .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "apps.bad name",
                "apps.bad name.module",
                "apps.bad name.listen[0]",
                "apps.bad name.listen[1]",
                "apps.bad name.listen",
                "apps.bad name.env.A=B",
                "apps.bad name.env.C",
                "apps.bad name.inherit-env",
                "apps.bad name.limits.memory",
                "apps.bad name.limits.timeout",
                "apps.bad name.limits.instances",
                "apps.bad name.limits.tables",
            ],
            "{err}"
        );
        let text = err.to_string();
        // The policy file's wording.
        for expected in [
            "is not a valid app name",
            "missing.wasm` does not exist (looked at",
            "`127.0.0.1:0`: port 0 is not allowed",
            "`unix:relative.sock`: a unix socket path must be absolute",
            "an http app needs at least one listen address",
            "not a valid environment variable name",
            "may not contain NUL",
            "1000 bytes is less than one Wasm page (64KiB)",
            "0s would stop every request at once",
            "0 is too small: must be at least 1",
            "2000000 is too large: must be at most 1000000",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let m = module(tmp.path());
        let grant = || DirGrant::new(tmp.path().to_path_buf(), "/data", Access::ReadOnly).unwrap();
        let err = AppSpec::builder("dup", &m, AppKind::Stdio)
            .listen(tcp("127.0.0.1:9000"))
            .listen(tcp("127.0.0.1:9000"))
            .dir(grant())
            .dir(grant())
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "apps.dup.listen[1]: `127.0.0.1:9000` is listed twice\n\
             apps.dup.dirs[1].guest: `/data` is granted twice"
        );
    }

    #[test]
    fn a_relative_module_is_taken_from_the_current_directory() {
        let here = std::env::current_dir().unwrap();
        let app = AppSpec::builder("rel", "Cargo.toml", AppKind::Command)
            .build()
            .unwrap();
        assert_eq!(app.module, here.join("Cargo.toml"));
        let err = AppSpec::builder("rel", "", AppKind::Command)
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "apps.rel.module: must not be empty");
    }
}
