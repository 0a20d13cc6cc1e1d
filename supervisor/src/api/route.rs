//! Routing of the socket API: from a request's method, path and body to
//! one [`Route`], or an [`ApiError`] that says which 4xx and why.
//!
//! Pure functions of their inputs (no I/O, no daemon state), so that the
//! fuzz target `api_route` (fuzz/) compiles this file on its own and feeds
//! it arbitrary bytes. Invariant: nothing here panics, whatever the input.

/// The largest request body accepted (bytes); more is `413`.
pub const MAX_BODY: usize = 64 * 1024;

/// Every endpoint the API serves, as `(method, path template)`; the
/// OpenAPI file (docs/openapi.json) documents exactly these (a test in
/// supervisor/tests/api.rs checks both ways).
pub const ENDPOINTS: [(&str, &str); 10] = [
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/{name}"),
    ("POST", "/v1/apps/{name}/start"),
    ("POST", "/v1/apps/{name}/stop"),
    ("POST", "/v1/apps/{name}/restart"),
    ("POST", "/v1/apps/{name}/recompile"),
    ("POST", "/v1/reload"),
    ("GET", "/v1/info"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
];

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    ListApps,
    GetApp(String),
    Start(String),
    Stop(String),
    Restart(String),
    Recompile(String),
    Reload,
    Info,
    Events,
    Metrics,
}

impl Route {
    /// The entry of [`ENDPOINTS`] this route is (exhaustive: a new route
    /// cannot be added without its endpoint).
    pub fn endpoint(&self) -> (&'static str, &'static str) {
        let i = match self {
            Route::ListApps => 0,
            Route::GetApp(_) => 1,
            Route::Start(_) => 2,
            Route::Stop(_) => 3,
            Route::Restart(_) => 4,
            Route::Recompile(_) => 5,
            Route::Reload => 6,
            Route::Info => 7,
            Route::Events => 8,
            Route::Metrics => 9,
        };
        ENDPOINTS[i]
    }

    /// Whether the route changes something (then it needs uid 0 or
    /// `daemon.api-group`, checked by the Manager).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Route::Start(_)
                | Route::Stop(_)
                | Route::Restart(_)
                | Route::Recompile(_)
                | Route::Reload
        )
    }
}

/// A request the API refuses before it reaches the Manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// A stable word for machines (`not_found`, `method_not_allowed`, ...).
    pub code: &'static str,
    pub message: String,
    /// For `405`: the methods the path accepts (the `Allow` header).
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }

    pub fn too_large() -> ApiError {
        ApiError::new(
            413,
            "payload_too_large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        )
    }

    /// A body that did not arrive in time (the connection is then closed).
    pub fn timeout() -> ApiError {
        ApiError::new(
            408,
            "request_timeout",
            "the request body did not arrive within 5 s",
        )
    }

    fn not_found(path: &str) -> ApiError {
        ApiError::new(
            404,
            "not_found",
            format!(
                "no such endpoint: {}; see GET /v1/apps, /v1/apps/NAME, /v1/info, /v1/events, /metrics",
                printable(path)
            ),
        )
    }

    fn method(method: &str, path: &str, allow: &'static str) -> ApiError {
        ApiError {
            status: 405,
            code: "method_not_allowed",
            message: format!("{} {}: use {allow}", printable(method), printable(path)),
            allow: Some(allow),
        }
    }

    /// The JSON body of the error: `{"error": code, "message": ...}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.code, "message": self.message }).to_string()
    }
}

/// At most 200 characters of `s`, control characters escaped: it goes
/// into a message.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_default).collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    out
}

/// The route for `method` and `path` (the URI's path, without the query).
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path
        .strip_prefix('/')
        .ok_or_else(|| ApiError::not_found(path))?
        .split('/')
        .collect();
    let (allow, route) = match segments.as_slice() {
        ["metrics"] => ("GET", Route::Metrics),
        ["v1", "apps"] => ("GET", Route::ListApps),
        ["v1", "info"] => ("GET", Route::Info),
        ["v1", "events"] => ("GET", Route::Events),
        ["v1", "reload"] => ("POST", Route::Reload),
        ["v1", "apps", name] if !name.is_empty() => ("GET", Route::GetApp(app_name(name)?)),
        ["v1", "apps", name, action] if !name.is_empty() => {
            let name = app_name(name)?;
            let route = match *action {
                "start" => Route::Start(name),
                "stop" => Route::Stop(name),
                "restart" => Route::Restart(name),
                "recompile" => Route::Recompile(name),
                _ => return Err(ApiError::not_found(path)),
            };
            ("POST", route)
        }
        _ => return Err(ApiError::not_found(path)),
    };
    if method == allow || (method == "HEAD" && allow == "GET" && route != Route::Events) {
        Ok(route)
    } else {
        Err(ApiError::method(method, path, allow))
    }
}

/// An app name as it appears in a path. Names in a policy are 1 to 64
/// letters, digits, `-` and `_`, so anything else cannot name an app: it
/// is a 404 `no_such_app` (not decoded, not passed on).
fn app_name(segment: &str) -> Result<String, ApiError> {
    let plausible = segment.len() <= 64
        && segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plausible {
        Ok(segment.to_string())
    } else {
        Err(ApiError::new(
            404,
            "no_such_app",
            format!("no app named {:?} in the policy", printable(segment)),
        ))
    }
}

/// Check a request's body. No endpoint takes parameters yet: the body may
/// be empty or a JSON object without members (`{}`); anything else is a
/// `400` that says why, so that a client sending options this version does
/// not know learns it instead of having them ignored.
pub fn check_body(body: &[u8]) -> Result<(), ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::too_large());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(members) => match members.keys().next() {
            None => Ok(()),
            Some(key) => Err(ApiError::bad_request(format!(
                "unknown field {:?}: this endpoint takes no parameters (send no body or {{}})",
                printable(key)
            ))),
        },
        _ => Err(ApiError::bad_request(
            "the body must be a JSON object (or empty)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_routes() {
        let cases = [
            ("GET", "/v1/apps", Route::ListApps),
            ("GET", "/v1/apps/web", Route::GetApp("web".into())),
            ("POST", "/v1/apps/web/start", Route::Start("web".into())),
            ("POST", "/v1/apps/web/stop", Route::Stop("web".into())),
            ("POST", "/v1/apps/web/restart", Route::Restart("web".into())),
            (
                "POST",
                "/v1/apps/w-1_x/recompile",
                Route::Recompile("w-1_x".into()),
            ),
            ("POST", "/v1/reload", Route::Reload),
            ("GET", "/v1/info", Route::Info),
            ("GET", "/v1/events", Route::Events),
            ("GET", "/metrics", Route::Metrics),
            ("HEAD", "/v1/info", Route::Info),
        ];
        for (method, path, want) in cases {
            assert_eq!(route(method, path), Ok(want), "{method} {path}");
        }
    }

    #[test]
    fn every_endpoint_routes_to_itself() {
        for (method, template) in ENDPOINTS {
            let routed = route(method, &template.replace("{name}", "app")).unwrap();
            assert_eq!(routed.endpoint(), (method, template));
        }
    }

    #[test]
    fn wrong_method_path_and_names_are_4xx() {
        let e = route("POST", "/v1/apps").unwrap_err();
        assert_eq!((e.status, e.allow), (405, Some("GET")));
        assert_eq!(route("GET", "/v1/reload").unwrap_err().status, 405);
        assert_eq!(route("DELETE", "/v1/apps/x/stop").unwrap_err().status, 405);
        assert_eq!(route("HEAD", "/v1/events").unwrap_err().status, 405);
        for path in [
            "",
            "/",
            "/v1",
            "/v1/apps/",
            "/v1/apps/x/kill",
            "/v2/apps",
            "/v1/apps/x/stop/y",
            "//v1/apps",
        ] {
            assert_eq!(route("GET", path).unwrap_err().status, 404, "{path:?}");
        }
        let e = route("GET", "/v1/apps/%2e%2e").unwrap_err();
        assert_eq!((e.status, e.code), (404, "no_such_app"));
        assert_eq!(
            route("GET", &format!("/v1/apps/{}", "a".repeat(65)))
                .unwrap_err()
                .code,
            "no_such_app"
        );
    }

    #[test]
    fn bodies_are_empty_or_an_empty_object() {
        assert!(check_body(b"").is_ok());
        assert!(check_body(b" \r\n").is_ok());
        assert!(check_body(b"{}").is_ok());
        let e = check_body(b"{").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(
            check_body(br#"{"force": true}"#)
                .unwrap_err()
                .message
                .contains("force")
        );
        assert_eq!(check_body(b"[]").unwrap_err().status, 400);
        assert_eq!(
            check_body(&vec![b' '; MAX_BODY + 1]).unwrap_err().status,
            413
        );
        let body: serde_json::Value =
            serde_json::from_str(&check_body(b"x").unwrap_err().body()).unwrap();
        assert_eq!(body["error"], "bad_request");
    }
}
