//! How `corral status|apps|start|stop|restart|recompile|reload|events`
//! reach corrald: HTTP over the API socket (default), or D-Bus
//! (`--bus system|session`).
//!
//! Both give the socket API's JSON (the Manager's types as serde writes
//! them), so the commands print the same thing whichever way they asked:
//! a D-Bus answer is turned back into that JSON by the rule the D-Bus
//! front end states (`CamelCase` property = `snake_case` field, `""`/`0`
//! = `null` where the field is optional).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::{Map, Value};
use wasmtime_wasi_http::io::TokioIo;

/// Exit codes of the commands that talk to corrald (also in `corral
/// --help` and docs/api.md).
pub mod exit {
    /// The call failed, or a reload was refused (the policy has errors).
    pub const FAILED: u8 = 1;
    /// No such app.
    pub const NO_SUCH_APP: u8 = 3;
    /// The caller may not do that (not root, not in `daemon.api-group`).
    pub const ACCESS_DENIED: u8 = 4;
    /// corrald could not be reached (no socket, not running, no bus, too
    /// many connections of this user).
    pub const UNREACHABLE: u8 = 5;
}

/// Which bus `--bus` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bus {
    System,
    Session,
}

/// Where corrald is: the options every command that talks to it shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The API socket [default: the policy's daemon.api-socket, else
    /// /run/corral/api.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "bus")]
    pub socket: Option<PathBuf>,

    /// Call corrald over D-Bus (org.corral.Manager1) instead of the socket.
    #[arg(long, value_name = "BUS")]
    pub bus: Option<Bus>,

    /// The policy whose daemon.api-socket is the default socket.
    #[arg(long, value_name = "PATH", default_value = corral_policy::defaults::POLICY_PATH)]
    pub policy: PathBuf,

    /// Print corrald's answer as JSON (one object per line for `events`).
    #[arg(long)]
    pub json: bool,
}

/// A failed call, with the exit code it gives.
#[derive(Debug)]
pub struct CallError {
    pub code: u8,
    pub message: String,
}

impl CallError {
    fn unreachable(message: String) -> CallError {
        CallError {
            code: exit::UNREACHABLE,
            message,
        }
    }

    fn failed(message: String) -> CallError {
        CallError {
            code: exit::FAILED,
            message,
        }
    }

    /// With where an unreachable socket's path came from, if that helps.
    fn noting(mut self, note: Option<String>) -> CallError {
        if let (exit::UNREACHABLE, Some(note)) = (self.code, note) {
            self.message.push_str(&format!("; that socket is {note}"));
        }
        self
    }

    /// Print the message and give the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("corral: {}", self.message);
        ExitCode::from(self.code)
    }
}

/// One call of the Manager.
#[derive(Debug, Clone)]
pub enum Call<'a> {
    ListApps,
    GetApp(&'a str),
    Info,
    Start(&'a str),
    Stop(&'a str),
    Restart(&'a str),
    Recompile(&'a str),
    Reload,
}

impl Target {
    /// The socket to use: `--socket`, else the policy's, else the default;
    /// and, when the policy could not be read, why (for the message when
    /// the socket cannot be reached either).
    pub fn socket_path(&self) -> (PathBuf, Option<String>) {
        if let Some(path) = &self.socket {
            return (path.clone(), None);
        }
        let env = corral_policy::Environment::from_process();
        if let Ok(policy) = corral_policy::load(&self.policy, &env) {
            return (policy.daemon.api_socket, None);
        }
        // A policy that does not validate for this user (a module it may
        // not read, say) still names the socket: read that key alone, from
        // the file and its drop-ins in merge order.
        let mut files = vec![self.policy.clone()];
        files.extend(corral_policy::drop_in_files(&self.policy).unwrap_or_default());
        let mut socket = None;
        let mut unread = None;
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    unread.get_or_insert(format!("{}: {e}", file.display()));
                    continue;
                }
            };
            let Ok(table) = text.parse::<toml::Table>() else {
                continue;
            };
            if let Some(written) = table
                .get("daemon")
                .and_then(|d| d.get("api-socket"))
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                socket = Some(file.parent().unwrap_or(Path::new(".")).join(written));
            }
        }
        match socket {
            Some(path) => (path, None),
            None => (
                env.runtime_directory
                    .map(|d| d.join("api.sock"))
                    .unwrap_or_else(|| PathBuf::from(corral_policy::defaults::API_SOCKET)),
                unread.map(|why| format!("the default, as the policy could not be read ({why})")),
            ),
        }
    }

    /// Make `call` and return corrald's JSON answer.
    pub fn call(&self, call: Call<'_>) -> Result<Value, CallError> {
        check_app_name(&call)?;
        runtime()?.block_on(async {
            match self.bus {
                Some(bus) => dbus_call(bus, call).await,
                None => {
                    let (path, note) = self.socket_path();
                    socket_call(&path, call).await.map_err(|e| e.noting(note))
                }
            }
        })
    }

    /// Follow the events: `each` gets every event's JSON until the stream
    /// ends (corrald went away: an error) or `each` returns false.
    pub fn follow_events(&self, each: &mut dyn FnMut(Value) -> bool) -> Result<(), CallError> {
        runtime()?.block_on(async {
            match self.bus {
                Some(bus) => dbus_events(bus, each).await,
                None => {
                    let (path, note) = self.socket_path();
                    socket_events(&path, each).await.map_err(|e| e.noting(note))
                }
            }
        })
    }
}

/// An app name the policy could not contain (`a b`, `x?y`, `../reload`,
/// empty) names no app: say so (exit 3) instead of building a request path
/// from it, which could not be parsed or would name something else.
fn check_app_name(call: &Call<'_>) -> Result<(), CallError> {
    let name = match call {
        Call::GetApp(n)
        | Call::Start(n)
        | Call::Stop(n)
        | Call::Restart(n)
        | Call::Recompile(n) => *n,
        Call::ListApps | Call::Info | Call::Reload => return Ok(()),
    };
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        return Ok(());
    }
    Err(CallError {
        code: exit::NO_SUCH_APP,
        message: format!(
            "no app named {name:?} in the policy (app names are 1 to 64 letters, digits, `-` or `_`)"
        ),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, CallError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::failed(format!("starting the runtime: {e}")))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(path: &Path) -> Result<Sender, CallError> {
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        CallError::unreachable(format!(
            "cannot reach corrald at {} ({e}); is it running? (--socket PATH, or --bus system)",
            path.display()
        ))
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::unreachable(format!("{}: {e}", path.display())))?;
    tokio::spawn(connection);
    Ok(sender)
}

fn request(method: &str, path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "corral")
        .body(Empty::new())
        .expect("a request made of valid parts")
}

fn route(call: &Call<'_>) -> (&'static str, String) {
    match call {
        Call::ListApps => ("GET", "/v1/apps".into()),
        Call::GetApp(name) => ("GET", format!("/v1/apps/{name}")),
        Call::Info => ("GET", "/v1/info".into()),
        Call::Start(name) => ("POST", format!("/v1/apps/{name}/start")),
        Call::Stop(name) => ("POST", format!("/v1/apps/{name}/stop")),
        Call::Restart(name) => ("POST", format!("/v1/apps/{name}/restart")),
        Call::Recompile(name) => ("POST", format!("/v1/apps/{name}/recompile")),
        Call::Reload => ("POST", "/v1/reload".into()),
    }
}

async fn socket_call(path: &Path, call: Call<'_>) -> Result<Value, CallError> {
    let mut sender = connect(path).await?;
    let (method, uri) = route(&call);
    let response = sender
        .send_request(request(method, &uri))
        .await
        .map_err(|e| CallError::unreachable(format!("{}: {e}", path.display())))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CallError::unreachable(format!("{}: {e}", path.display())))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        CallError::failed(format!(
            "corrald answered {status} with something not JSON: {e}"
        ))
    })?;
    if status.is_success() {
        return Ok(value);
    }
    let message = value["message"].as_str().unwrap_or("").to_string();
    Err(CallError {
        code: match value["error"].as_str() {
            Some("no_such_app") => exit::NO_SUCH_APP,
            Some("access_denied") => exit::ACCESS_DENIED,
            Some("shutting_down" | "busy") => exit::UNREACHABLE,
            _ => exit::FAILED,
        },
        message,
    })
}

async fn socket_events(path: &Path, each: &mut dyn FnMut(Value) -> bool) -> Result<(), CallError> {
    let mut sender = connect(path).await?;
    let response = sender
        .send_request(request("GET", "/v1/events"))
        .await
        .map_err(|e| CallError::unreachable(format!("{}: {e}", path.display())))?;
    if !response.status().is_success() {
        return Err(CallError::failed(format!(
            "corrald answered {} to GET /v1/events",
            response.status()
        )));
    }
    let mut body = response.into_body();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| CallError::unreachable(format!("the event stream broke: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        // One event per blank-line-terminated block; `data:` lines hold
        // its JSON, comment lines (`:`) are keep-alives.
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue;
            }
            if let Ok(event) = serde_json::from_str(&data.join("\n"))
                && !each(event)
            {
                return Ok(());
            }
        }
    }
    Err(CallError::unreachable(
        "corrald closed the event stream (it stopped?)".into(),
    ))
}

const BUS_NAME: &str = "org.corral.Manager1";
const OBJECT: &str = "/org/corral/Manager1";
const INTERFACE: &str = "org.corral.Manager1";

async fn bus(bus: Bus) -> Result<zbus::Connection, CallError> {
    let connection = match bus {
        Bus::System => zbus::Connection::system().await,
        Bus::Session => zbus::Connection::session().await,
    };
    connection.map_err(|e| CallError::unreachable(format!("cannot reach the {bus:?} bus: {e}")))
}

fn bus_error(e: zbus::Error) -> CallError {
    // zbus 6 hands the replies named like a standard error
    // (org.freedesktop.DBus.Error.AccessDenied, ServiceUnknown, ...) over as
    // Error::FDO, and only the others as MethodError.
    let named = match &e {
        zbus::Error::MethodError(name, message, _) => {
            Some((name.to_string(), message.clone().unwrap_or_default()))
        }
        zbus::Error::FDO(fdo) => Some((
            zbus::DBusError::name(&**fdo).to_string(),
            zbus::DBusError::description(&**fdo)
                .unwrap_or_default()
                .to_string(),
        )),
        _ => None,
    };
    if let Some((name, message)) = named {
        let code = match name.as_str() {
            "org.corral.Manager1.Error.NoSuchApp" => exit::NO_SUCH_APP,
            "org.freedesktop.DBus.Error.AccessDenied" => exit::ACCESS_DENIED,
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner"
            | "org.corral.Manager1.Error.ShuttingDown" => exit::UNREACHABLE,
            _ => exit::FAILED,
        };
        return CallError {
            code,
            message: if message.is_empty() { name } else { message },
        };
    }
    CallError::failed(format!("D-Bus: {e}"))
}

async fn method(
    conn: &zbus::Connection,
    name: &str,
    args: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) -> Result<zbus::Message, CallError> {
    conn.call_method(Some(BUS_NAME), OBJECT, Some(INTERFACE), name, args)
        .await
        .map_err(bus_error)
}

fn decode<T>(reply: &zbus::Message) -> Result<T, CallError>
where
    T: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
{
    reply
        .body()
        .deserialize::<T>()
        .map_err(|e| CallError::failed(format!("unexpected D-Bus answer: {e}")))
}

type Dict = std::collections::HashMap<String, zbus::OwnedVariant>;

async fn dbus_call(which: Bus, call: Call<'_>) -> Result<Value, CallError> {
    let conn = bus(which).await?;
    let app = |reply: zbus::Message| -> Result<Value, CallError> {
        Ok(dict_to_json(&decode::<Dict>(&reply)?))
    };
    match call {
        Call::ListApps => {
            type Row = (
                String,
                String,
                String,
                u32,
                u32,
                u64,
                u64,
                zbus::OwnedObjectPath,
            );
            let rows: Vec<Row> = decode(&method(&conn, "ListApps", &()).await?)?;
            let mut apps = Vec::new();
            for row in rows {
                let reply = method(&conn, "GetApp", &(row.0.as_str(),)).await?;
                apps.push(app(reply)?);
            }
            Ok(Value::Array(apps))
        }
        Call::GetApp(name) => app(method(&conn, "GetApp", &(name,)).await?),
        Call::Start(name) => app(method(&conn, "StartApp", &(name,)).await?),
        Call::Stop(name) => app(method(&conn, "StopApp", &(name,)).await?),
        Call::Restart(name) => app(method(&conn, "RestartApp", &(name,)).await?),
        Call::Recompile(name) => app(method(&conn, "Recompile", &(name,)).await?),
        Call::Reload => {
            type Problem = (String, u32, u32, String, String, String);
            type Report = (
                bool,
                Vec<Problem>,
                Vec<String>,
                Vec<String>,
                Vec<String>,
                Vec<String>,
                Vec<(String, String)>,
            );
            let (applied, errors, added, removed, changed, unchanged, refused): Report =
                decode(&method(&conn, "Reload", &()).await?)?;
            let refused: Vec<Value> = refused
                .into_iter()
                .map(|(app, reason)| serde_json::json!({"app": app, "reason": reason}))
                .collect();
            let errors: Vec<Value> = errors
                .into_iter()
                .map(|(file, line, column, key, message, text)| {
                    serde_json::json!({"file": file, "line": line, "column": column,
                        "key": key, "message": message, "text": text})
                })
                .collect();
            Ok(
                serde_json::json!({"applied": applied, "errors": errors, "added": added,
                "removed": removed, "changed": changed, "unchanged": unchanged,
                "refused": refused}),
            )
        }
        Call::Info => {
            let reply = conn
                .call_method(
                    Some(BUS_NAME),
                    OBJECT,
                    Some("org.freedesktop.DBus.Properties"),
                    "GetAll",
                    &(INTERFACE,),
                )
                .await
                .map_err(bus_error)?;
            let mut info = dict_to_json(&decode::<Dict>(&reply)?);
            // The cache is one nested object in the socket's JSON.
            if let Value::Object(fields) = &mut info {
                let mut cache = Map::new();
                for (flat, nested) in [
                    ("cache_dir", "dir"),
                    ("cache_entries", "entries"),
                    ("cache_bytes", "bytes"),
                ] {
                    if let Some(v) = fields.remove(flat) {
                        cache.insert(nested.into(), v);
                    }
                }
                fields.insert("cache".into(), Value::Object(cache));
                // So is the template; "" and 0 are its nulls.
                let mut template = Map::new();
                for (flat, nested) in [
                    ("template_state", "state"),
                    ("template_pid", "pid"),
                    ("template_restarts", "restarts"),
                    ("template_last_error", "last_error"),
                    ("template_pss_bytes", "pss_bytes"),
                ] {
                    if let Some(v) = fields.remove(flat) {
                        let none = nested != "restarts" && (v == "" || v == 0);
                        template.insert(nested.into(), if none { Value::Null } else { v });
                    }
                }
                fields.insert("template".into(), Value::Object(template));
            }
            Ok(info)
        }
    }
}

/// `StateSince` → `state_since`.
fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Fields that are `null` in the JSON when D-Bus says `""` or `0`.
const OPTIONAL: [&str; 5] = ["last_error", "digest", "artifact", "world", "zygote_pid"];

fn dict_to_json(dict: &Dict) -> Value {
    let mut out = Map::new();
    let mut keys: Vec<&String> = dict.keys().collect();
    keys.sort();
    for key in keys {
        let name = snake_case(key);
        let value = variant_to_json(&dict[key]);
        let empty = matches!(&value, Value::String(s) if s.is_empty()) || value.as_u64() == Some(0);
        out.insert(
            name.clone(),
            if empty && OPTIONAL.contains(&name.as_str()) {
                Value::Null
            } else {
                value
            },
        );
    }
    Value::Object(out)
}

/// A nested dict: the app's `Cgroup` (a{sv} with CamelCase keys, `Limits`
/// a{ss}) as the socket API's `cgroup` object, its `Tls` (CamelCase keys)
/// as `tls`; `null` when empty.
fn dict_value_to_json(dict: &zbus::Dict<'_, '_>) -> Value {
    let mut out = Map::new();
    for (k, v) in dict.iter() {
        let key = match variant_to_json(k) {
            Value::String(s) => s,
            other => other.to_string(),
        };
        out.insert(key, variant_to_json(v));
    }
    if out.is_empty() {
        return Value::Null;
    }
    // Only the Cgroup dict has CamelCase keys: snake_case them, 0 peak is
    // unknown, its limits are [file, value] pairs.
    if out.contains_key("Path") {
        let mut cg: Map<String, Value> =
            out.into_iter().map(|(k, v)| (snake_case(&k), v)).collect();
        if cg.get("memory_peak_bytes").and_then(Value::as_u64) == Some(0) {
            cg.insert("memory_peak_bytes".into(), Value::Null);
        }
        let limits: Vec<Value> = cg
            .get("limits")
            .and_then(Value::as_object)
            .map(|m| {
                let mut pairs: Vec<(&String, &Value)> = m.iter().collect();
                pairs.sort_by(|a, b| a.0.cmp(b.0));
                pairs
                    .into_iter()
                    .map(|(k, v)| Value::Array(vec![Value::from(k.as_str()), v.clone()]))
                    .collect()
            })
            .unwrap_or_default();
        cg.insert("limits".into(), Value::Array(limits));
        return Value::Object(cg);
    }
    // The Tls dict: CamelCase keys too (a Limits dict's are cgroup files).
    if out
        .keys()
        .all(|k| k.starts_with(|c: char| c.is_ascii_uppercase()))
    {
        return Value::Object(out.into_iter().map(|(k, v)| (snake_case(&k), v)).collect());
    }
    Value::Object(out)
}

fn variant_to_json(v: &zbus::Variant<'_>) -> Value {
    use zbus::Variant as V;
    match v {
        V::Bool(b) => Value::from(*b),
        V::U8(n) => Value::from(*n),
        V::I16(n) => Value::from(*n),
        V::U16(n) => Value::from(*n),
        V::I32(n) => Value::from(*n),
        V::U32(n) => Value::from(*n),
        V::I64(n) => Value::from(*n),
        V::U64(n) => Value::from(*n),
        V::F64(n) => Value::from(*n),
        V::Str(s) => Value::from(s.as_str()),
        V::ObjectPath(p) => Value::from(p.as_str()),
        V::Variant(inner) => variant_to_json(inner),
        V::Array(items) => Value::Array(items.iter().map(variant_to_json).collect()),
        V::Dict(dict) => dict_value_to_json(dict),
        other => Value::from(format!("{other:?}")),
    }
}

async fn dbus_events(which: Bus, each: &mut dyn FnMut(Value) -> bool) -> Result<(), CallError> {
    let conn = bus(which).await?;
    let rule_error = |e: zbus::Error| CallError::failed(format!("D-Bus match rule: {e}"));
    // From corrald only: the bus resolves the name to its owner, so no other
    // client can slip an AppStateChanged of its own into the stream.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .interface(INTERFACE)
        .member("AppStateChanged")
        .path(OBJECT)
        .build()
        .map_err(rule_error)?;
    let mut stream =
        zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(64))
            .await
            .map_err(bus_error)?;
    // corrald leaving the bus ends the stream, as over the socket.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .member("NameOwnerChanged")
        .arg(0, BUS_NAME)
        .build()
        .map_err(rule_error)?;
    let mut owners =
        zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(8))
            .await
            .map_err(bus_error)?;
    let gone = || {
        CallError::unreachable(format!(
            "nobody owns {BUS_NAME} on the {which:?} bus (corrald not running, or without D-Bus?)"
        ))
    };
    // Subscribed first, then asked: corrald cannot leave unnoticed between.
    let owned: bool = decode(
        &conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &(BUS_NAME,),
            )
            .await
            .map_err(bus_error)?,
    )?;
    if !owned {
        return Err(gone());
    }
    loop {
        let message = tokio::select! {
            message = next(&mut stream) => message,
            change = next(&mut owners) => {
                let left = match change {
                    Some(Ok(change)) => change
                        .body()
                        .deserialize::<(String, String, String)>()
                        .is_ok_and(|(_, _, new_owner)| new_owner.is_empty()),
                    _ => true,
                };
                if left {
                    return Err(CallError::unreachable(format!(
                        "corrald left the {which:?} bus (it stopped?)"
                    )));
                }
                continue;
            }
        };
        let Some(message) = message else { break };
        let Ok(message) = message else { continue };
        type Signal = (u64, u64, String, String, String, u32, String);
        let Ok((seq, time, app, old, state, workers, detail)) =
            message.body().deserialize::<Signal>()
        else {
            continue;
        };
        let event = serde_json::json!({
            "seq": seq, "time": time, "app": app,
            "old": if old.is_empty() { Value::Null } else { Value::from(old) },
            "state": state, "workers": workers,
            "detail": if detail.is_empty() { Value::Null } else { Value::from(detail) },
        });
        if !each(event) {
            return Ok(());
        }
    }
    Err(CallError::unreachable("the bus connection closed".into()))
}

/// `StreamExt::next`, on the `Stream` trait zbus re-exports.
async fn next<S>(stream: &mut S) -> Option<S::Item>
where
    S: zbus::export::futures_core::Stream + Unpin,
{
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_no_policy_can_hold_are_no_such_app_before_any_request() {
        for name in [
            "a b",
            "hello?x",
            "hello/../../reload",
            "",
            "\u{e9}",
            &"a".repeat(65),
        ] {
            let e = check_app_name(&Call::Stop(name)).unwrap_err();
            assert_eq!(e.code, exit::NO_SUCH_APP, "{name:?}");
            assert!(e.message.contains("no app named"), "{}", e.message);
        }
        assert!(check_app_name(&Call::GetApp("hello-web_2")).is_ok());
        assert!(check_app_name(&Call::Reload).is_ok());
    }

    #[test]
    fn dbus_names_become_json_names() {
        assert_eq!(snake_case("StateSince"), "state_since");
        assert_eq!(snake_case("ZygotePid"), "zygote_pid");
        assert_eq!(snake_case("Name"), "name");
    }

    #[test]
    fn a_tls_dict_becomes_the_apis_tls_object() {
        use std::collections::BTreeMap;
        let tls: BTreeMap<String, zbus::Variant<'static>> = BTreeMap::from([
            ("Subject".to_string(), zbus::Variant::from("CN=web")),
            (
                "Names".to_string(),
                zbus::Variant::from(vec!["web".to_string()]),
            ),
            ("NotBefore".to_string(), zbus::Variant::from(1i64)),
            ("NotAfter".to_string(), zbus::Variant::from(2i64)),
        ]);
        assert_eq!(
            variant_to_json(&zbus::Variant::from(tls)),
            serde_json::json!({"subject": "CN=web", "names": ["web"], "not_before": 1, "not_after": 2})
        );
        let none: BTreeMap<String, zbus::Variant<'static>> = BTreeMap::new();
        assert_eq!(variant_to_json(&zbus::Variant::from(none)), Value::Null);
    }
}
