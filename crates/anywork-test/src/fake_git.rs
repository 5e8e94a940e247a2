//! A git server over "smart HTTP" on loopback: `git http-backend` (CGI) behind a tiny axum
//! server, serving the bare repositories under a folder, fetch and push, with GitHub's way of
//! taking a token (`Authorization: Basic base64("x-access-token:<token>")`; anything else is
//! answered 401). It records the `Authorization` header of every request.
//!
//! ```no_run
//! # async fn demo(root: &std::path::Path) {
//! use anywork_test::fake_git::GitHttpServer;
//! let git = GitHttpServer::start(root, "ghs_token").await;
//! let url = git.repo_url("octo/hello.git"); // http://127.0.0.1:PORT/octo/hello.git
//! # }
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::task::JoinHandle;

use crate::fake_http::serve;

struct GitState {
    root: PathBuf,
    token: String,
    /// `METHOD path?query authorization` of each request.
    seen: Vec<(String, Option<String>)>,
}

/// The server. Stops when dropped.
pub struct GitHttpServer {
    url: String,
    state: Arc<Mutex<GitState>>,
    server: JoinHandle<()>,
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl GitHttpServer {
    /// Serves the bare repositories under `root` to clients with `token`.
    pub async fn start(root: &Path, token: &str) -> Self {
        let state = Arc::new(Mutex::new(GitState {
            root: root.to_owned(),
            token: token.to_owned(),
            seen: Vec::new(),
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (addr, server) = serve(app).await;
        Self {
            url: format!("http://{addr}"),
            state,
            server,
        }
    }

    /// The base URL, no trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The clone URL of the repository at `path` under the root.
    pub fn repo_url(&self, path: &str) -> String {
        format!("{}/{}", self.url, path.trim_start_matches('/'))
    }

    /// Every request as `(METHOD /path?query, Authorization header)`, oldest first.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// Whether a push (`git-receive-pack`) was served.
    pub fn pushed(&self) -> bool {
        self.requests()
            .iter()
            .any(|(line, _)| line.starts_with("POST ") && line.contains("git-receive-pack"))
    }
}

fn status(code: u16, text: &str) -> Response {
    let mut r = Response::new(Body::from(text.to_owned()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

async fn handle(
    State(state): State<Arc<Mutex<GitState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let (root, token) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.seen.push((
            format!(
                "{method} {}",
                uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
            ),
            auth.clone(),
        ));
        (s.root.clone(), s.token.clone())
    };
    let wanted = format!(
        "Basic {}",
        STANDARD.encode(format!("x-access-token:{token}"))
    );
    if auth.as_deref() != Some(wanted.as_str()) {
        let mut r = status(401, "Bad credentials");
        r.headers_mut().insert(
            "www-authenticate",
            axum::http::HeaderValue::from_static("Basic realm=\"fake git\""),
        );
        return r;
    }
    if uri.path().contains("..") {
        return status(400, "bad path");
    }
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", &root)
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take();
        let writer = std::thread::spawn(move || {
            if let Some(stdin) = stdin.as_mut() {
                let _ = stdin.write_all(&body);
            }
        });
        let mut stdout = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_end(&mut stdout)?;
        }
        let mut stderr = Vec::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_end(&mut stderr)?;
        }
        let _ = writer.join();
        let status = child.wait()?;
        Ok(std::process::Output {
            status,
            stdout,
            stderr,
        })
    })
    .await;
    let out = match out {
        Ok(Ok(out)) => out,
        _ => return status(500, "git http-backend did not run"),
    };
    // CGI: headers, a blank line, the body.
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            raw.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((end, body_at)) = split else {
        return status(
            500,
            &format!(
                "git http-backend answered no headers: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    };
    let mut response = Response::new(Body::from(raw[body_at..].to_vec()));
    for line in String::from_utf8_lossy(&raw[..end]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("status") {
            let code = v.split_whitespace().next().and_then(|c| c.parse().ok());
            *response.status_mut() = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(v),
        ) {
            response.headers_mut().append(k, v);
        }
    }
    response
}
