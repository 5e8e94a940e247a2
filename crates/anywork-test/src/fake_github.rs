//! A fake of the GitHub REST API on loopback, enough for a channel that comments: issue
//! comments and pull-request review comments (create, reply, edit, list with `since` and
//! pages), reactions, pull requests (create), and GitHub App installation tokens (the JWT is checked against the
//! app's key, as GitHub does). It records every request and injects faults.
//!
//! Authentication: every call needs `Authorization: Bearer <token>` with a token allowed by
//! [`FakeGithub::allow_token`] or issued by `POST /app/installations/{id}/access_tokens`
//! (else 401 `Bad credentials`). The two App routes take the app's RS256 JWT instead.
//!
//! ```no_run
//! # async fn demo() {
//! use anywork_test::fake_github::FakeGithub;
//! let gh = FakeGithub::start().await;
//! gh.allow_token("ghp_test");
//! // point the channel at gh.url() (GITHUB_API_URL) …
//! assert!(gh.comments_on("octo/repo", 1).is_empty());
//! # }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub use crate::fake_http::{Fault, Recorded};
use crate::fake_http::{serve, take_fault, unix_now};

/// An RSA key (PKCS#1 PEM, as GitHub hands out) made for these tests only.
pub const TEST_APP_PRIVATE_KEY: &str = include_str!("../data/github-app-test-key.pem");
/// The same key in PKCS#8 PEM.
pub const TEST_APP_PRIVATE_KEY_PKCS8: &str = include_str!("../data/github-app-test-key.pkcs8.pem");

/// A comment the fake holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GhComment {
    /// Its id (unique across both kinds, increasing).
    pub id: u64,
    /// `owner/name`.
    pub repo: String,
    /// The issue or pull request number.
    pub number: u64,
    /// A pull-request review comment (else an issue comment).
    pub review: bool,
    /// For review replies: the thread's first comment.
    pub in_reply_to: Option<u64>,
    /// The text.
    pub body: String,
    /// Who wrote it.
    pub user: String,
    /// Earlier texts, oldest first (one per edit).
    pub edits: Vec<String>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last change, Unix seconds.
    pub updated_at: i64,
}

/// A reaction the fake holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GhReaction {
    /// `owner/name`.
    pub repo: String,
    /// `issue:<number>`, `comment:<id>` or `review_comment:<id>`.
    pub target: String,
    /// `eyes`, `+1`, …
    pub content: String,
}

/// A pull request opened through the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GhPull {
    /// `owner/name`.
    pub repo: String,
    /// Its number.
    pub number: u64,
    /// `title` as sent.
    pub title: String,
    /// `head` (the branch) as sent.
    pub head: String,
    /// `base` as sent.
    pub base: String,
    /// `body` as sent.
    pub body: Option<String>,
    /// `draft` as sent.
    pub draft: bool,
}

struct App {
    id: String,
    public_key: Vec<u8>,
}

struct GhState {
    tokens: HashSet<String>,
    app: Option<App>,
    installations: BTreeMap<String, u64>,
    token_ttl: Duration,
    issued: Vec<(u64, String)>,
    next_id: u64,
    comments: Vec<GhComment>,
    reactions: Vec<GhReaction>,
    pulls: Vec<GhPull>,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
    login: String,
}

type Shared = Arc<Mutex<GhState>>;

fn lock(s: &Shared) -> MutexGuard<'_, GhState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake API. Stops when dropped.
pub struct FakeGithub {
    url: String,
    state: Shared,
    server: JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeGithub {
    /// Starts the fake on `127.0.0.1`. Comments it creates are by `anywork[bot]`.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(GhState {
            tokens: HashSet::new(),
            app: None,
            installations: BTreeMap::new(),
            token_ttl: Duration::from_secs(3600),
            issued: Vec::new(),
            next_id: 1000,
            comments: Vec::new(),
            reactions: Vec::new(),
            pulls: Vec::new(),
            requests: Vec::new(),
            faults: Vec::new(),
            login: "anywork[bot]".into(),
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (addr, server) = serve(app).await;
        Self {
            url: format!("http://{addr}"),
            state,
            server,
        }
    }

    /// The base URL (`GITHUB_API_URL`), no trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Accepts `token` as a Bearer token (a PAT).
    pub fn allow_token(&self, token: &str) {
        lock(&self.state).tokens.insert(token.to_owned());
    }

    /// Sets up a GitHub App: JWTs must be signed by `private_key_pem` with `iss` = `app_id`.
    ///
    /// # Panics
    /// If the key is not an RSA PEM key.
    pub fn set_app(&self, app_id: &str, private_key_pem: &str) {
        let der = PrivateKeyDer::from_pem_slice(private_key_pem.as_bytes()).expect("a PEM key");
        let pair = match &der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => panic!("not an RSA key"),
        }
        .expect("an RSA key");
        lock(&self.state).app = Some(App {
            id: app_id.to_owned(),
            public_key: pair.public_key().as_ref().to_vec(),
        });
    }

    /// `GET /repos/{repo}/installation` answers `id`.
    pub fn set_installation(&self, repo: &str, id: u64) {
        lock(&self.state).installations.insert(repo.to_owned(), id);
    }

    /// Lifetime of installation tokens issued from now on (GitHub: one hour).
    pub fn set_token_ttl(&self, ttl: Duration) {
        lock(&self.state).token_ttl = ttl;
    }

    /// Installation tokens issued so far: `(installation id, token)`.
    pub fn issued_tokens(&self) -> Vec<(u64, String)> {
        lock(&self.state).issued.clone()
    }

    /// Every comment, in creation order.
    pub fn comments(&self) -> Vec<GhComment> {
        lock(&self.state).comments.clone()
    }

    /// The comments (of both kinds) on `repo#number`, in creation order.
    pub fn comments_on(&self, repo: &str, number: u64) -> Vec<GhComment> {
        lock(&self.state)
            .comments
            .iter()
            .filter(|c| c.repo == repo && c.number == number)
            .cloned()
            .collect()
    }

    /// Adds a comment by `user` (as if written on GitHub); returns its id.
    pub fn add_comment(&self, repo: &str, number: u64, user: &str, body: &str) -> u64 {
        let mut s = lock(&self.state);
        s.next_id += 1;
        let id = s.next_id;
        let now = unix_now();
        s.comments.push(GhComment {
            id,
            repo: repo.into(),
            number,
            review: false,
            in_reply_to: None,
            body: body.into(),
            user: user.into(),
            edits: Vec::new(),
            created_at: now,
            updated_at: now,
        });
        id
    }

    /// Adds a pull-request review comment by `user` (the start of a review thread); returns
    /// its id.
    pub fn add_review_comment(&self, repo: &str, number: u64, user: &str, body: &str) -> u64 {
        let id = self.add_comment(repo, number, user, body);
        if let Some(c) = lock(&self.state).comments.iter_mut().find(|c| c.id == id) {
            c.review = true;
        }
        id
    }

    /// Deletes a comment (as a user would on GitHub).
    pub fn delete_comment(&self, id: u64) {
        lock(&self.state).comments.retain(|c| c.id != id);
    }

    /// Every reaction, in order.
    pub fn reactions(&self) -> Vec<GhReaction> {
        lock(&self.state).reactions.clone()
    }

    /// Every pull request opened, in order. Numbers start at 100.
    pub fn pulls(&self) -> Vec<GhPull> {
        lock(&self.state).pulls.clone()
    }

    /// Every request, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// The requests as `METHOD /path` lines (no query string).
    pub fn request_lines(&self) -> Vec<String> {
        self.requests().iter().map(Recorded::line).collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// Injects a fault.
    pub fn inject(&self, fault: Fault) {
        lock(&self.state).faults.push(fault);
    }
}

fn reply(status: u16, body: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn message(status: u16, msg: &str) -> Response {
    reply(
        status,
        json!({"message": msg, "documentation_url": "https://docs.github.com/rest"}),
    )
}

fn rfc3339(secs: i64) -> String {
    // Only for display in answers; the fake compares `since` as text of the same shape.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn comment_json(c: &GhComment) -> Value {
    let kind = if c.review { "pull" } else { "issues" };
    let mut v = json!({
        "id": c.id,
        "body": c.body,
        "user": {"login": c.user, "type": if c.user.ends_with("[bot]") { "Bot" } else { "User" }},
        "created_at": rfc3339(c.created_at),
        "updated_at": rfc3339(c.updated_at),
        "html_url": format!("https://github.com/{}/{kind}/{}#comment-{}", c.repo, c.number, c.id),
    });
    if let Some(r) = c.in_reply_to {
        v["in_reply_to_id"] = json!(r);
    }
    v
}

/// Checks an App JWT: RS256 by the app's key, `iss` the app, not expired, at most 10 minutes.
fn check_jwt(app: &App, jwt: &str) -> Result<(), &'static str> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("A JSON web token could not be decoded");
    };
    let decode = |p: &str| {
        URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "A JSON web token could not be decoded")
    };
    let header: Value = serde_json::from_slice(&decode(h)?).map_err(|_| "bad JWT header")?;
    if header["alg"] != "RS256" {
        return Err("JWT alg must be RS256");
    }
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &app.public_key)
        .verify(format!("{h}.{c}").as_bytes(), &decode(sig)?)
        .map_err(|_| "A JSON web token could not be decoded")?;
    let claims: Value = serde_json::from_slice(&decode(c)?).map_err(|_| "bad JWT claims")?;
    let iss_ok = claims["iss"].as_str() == Some(app.id.as_str())
        || claims["iss"].as_u64().map(|n| n.to_string()).as_deref() == Some(app.id.as_str());
    if !iss_ok {
        return Err("'Issuer' claim ('iss') must be an Integer");
    }
    let (iat, exp, now) = (
        claims["iat"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
        unix_now(),
    );
    if exp <= now || iat > now + 60 || exp - iat > 600 {
        return Err("'Expiration time' claim ('exp') is too far in the future or past");
    }
    Ok(())
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Recorded::new(&method, &uri, &headers, &body);
    let mut s = lock(&state);
    s.requests.push(req.clone());
    if let Some(f) = take_fault(&mut s.faults, &req) {
        let mut r = reply(f.status, f.body);
        for (k, v) in f.headers {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::from_bytes(k.as_bytes()),
                axum::http::HeaderValue::from_str(&v),
            ) {
                r.headers_mut().insert(k, v);
            }
        }
        return r;
    }
    let bearer = req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let segs: Vec<&str> = req.path_only().trim_matches('/').split('/').collect();
    let m = req.method.as_str();

    // The App routes: authenticated by the JWT.
    match (m, segs.as_slice()) {
        ("POST", ["app", "installations", id, "access_tokens"]) => {
            let Some(app) = &s.app else {
                return message(401, "no GitHub App is set up in the fake");
            };
            if let Err(e) = check_jwt(app, &bearer) {
                return message(401, e);
            }
            let Ok(id) = id.parse::<u64>() else {
                return message(404, "Not Found");
            };
            let token = format!("ghs_fake{}", s.issued.len() + 1);
            s.tokens.insert(token.clone());
            s.issued.push((id, token.clone()));
            let expires = unix_now() + s.token_ttl.as_secs() as i64;
            return reply(201, json!({"token": token, "expires_at": rfc3339(expires)}));
        }
        ("GET", ["repos", o, r, "installation"]) => {
            let Some(app) = &s.app else {
                return message(401, "no GitHub App is set up in the fake");
            };
            if let Err(e) = check_jwt(app, &bearer) {
                return message(401, e);
            }
            return match s.installations.get(&format!("{o}/{r}")) {
                Some(id) => reply(200, json!({"id": id})),
                None => message(404, "Not Found"),
            };
        }
        _ => {}
    }
    if !s.tokens.contains(&bearer) {
        return message(401, "Bad credentials");
    }
    let now = unix_now();
    let login = s.login.clone();
    let text = |v: &Value| v["body"].as_str().map(str::to_owned);
    match (m, segs.as_slice()) {
        ("POST", ["repos", o, r, "issues", n, "comments"]) => {
            let (Ok(n), Some(body)) = (n.parse::<u64>(), text(&req.body)) else {
                return message(422, "Validation Failed");
            };
            s.next_id += 1;
            let c = GhComment {
                id: s.next_id,
                repo: format!("{o}/{r}"),
                number: n,
                review: false,
                in_reply_to: None,
                body,
                user: login,
                edits: Vec::new(),
                created_at: now,
                updated_at: now,
            };
            let v = comment_json(&c);
            s.comments.push(c);
            reply(201, v)
        }
        ("POST", ["repos", o, r, "pulls", n, "comments", root, "replies"]) => {
            let (Ok(n), Ok(root), Some(body)) =
                (n.parse::<u64>(), root.parse::<u64>(), text(&req.body))
            else {
                return message(422, "Validation Failed");
            };
            let repo = format!("{o}/{r}");
            if !s
                .comments
                .iter()
                .any(|c| c.id == root && c.review && c.repo == repo)
            {
                return message(404, "Not Found");
            }
            s.next_id += 1;
            let c = GhComment {
                id: s.next_id,
                repo,
                number: n,
                review: true,
                in_reply_to: Some(root),
                body,
                user: login,
                edits: Vec::new(),
                created_at: now,
                updated_at: now,
            };
            let v = comment_json(&c);
            s.comments.push(c);
            reply(201, v)
        }
        ("GET", ["repos", o, r, kind @ ("issues" | "pulls"), n, "comments"]) => {
            let Ok(n) = n.parse::<u64>() else {
                return message(404, "Not Found");
            };
            let repo = format!("{o}/{r}");
            let review = *kind == "pulls";
            let since = req.query_param("since");
            let per_page: usize = req
                .query_param("per_page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(30)
                .clamp(1, 100);
            let page: usize = req
                .query_param("page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .max(1);
            let list: Vec<Value> = s
                .comments
                .iter()
                .filter(|c| c.repo == repo && c.number == n && c.review == review)
                .filter(|c| {
                    since
                        .as_deref()
                        .is_none_or(|since| rfc3339(c.updated_at).as_str() >= since)
                })
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(comment_json)
                .collect();
            reply(200, Value::Array(list))
        }
        ("PATCH", ["repos", o, r, kind @ ("issues" | "pulls"), "comments", id]) => {
            let (Ok(id), Some(body)) = (id.parse::<u64>(), text(&req.body)) else {
                return message(422, "Validation Failed");
            };
            let repo = format!("{o}/{r}");
            let review = *kind == "pulls";
            match s
                .comments
                .iter_mut()
                .find(|c| c.id == id && c.repo == repo && c.review == review)
            {
                Some(c) => {
                    let old = std::mem::replace(&mut c.body, body);
                    c.edits.push(old);
                    c.updated_at = now;
                    let v = comment_json(c);
                    reply(200, v)
                }
                None => message(404, "Not Found"),
            }
        }
        ("POST", ["repos", o, r, "pulls"]) => {
            let field = |k: &str| req.body[k].as_str().map(str::to_owned);
            let (Some(title), Some(head), Some(base)) =
                (field("title"), field("head"), field("base"))
            else {
                return message(422, "Validation Failed");
            };
            let repo = format!("{o}/{r}");
            if s.pulls.iter().any(|p| p.repo == repo && p.head == head) {
                return reply(
                    422,
                    json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest",
                        "code": "custom", "message": format!("A pull request already exists for {o}:{head}.")}]}),
                );
            }
            let number = 100 + s.pulls.len() as u64;
            let pull = GhPull {
                repo: repo.clone(),
                number,
                title,
                head,
                base,
                body: field("body"),
                draft: req.body["draft"].as_bool().unwrap_or(false),
            };
            let v = json!({
                "number": number, "state": "open", "title": pull.title, "body": pull.body,
                "draft": pull.draft,
                "html_url": format!("https://github.com/{repo}/pull/{number}"),
                "head": {"ref": pull.head}, "base": {"ref": pull.base},
            });
            s.pulls.push(pull);
            reply(201, v)
        }
        ("POST", ["repos", o, r, rest @ .., "reactions"]) => {
            let target = match rest {
                ["issues", "comments", id] => format!("comment:{id}"),
                ["pulls", "comments", id] => format!("review_comment:{id}"),
                ["issues", n] => format!("issue:{n}"),
                _ => return message(404, "Not Found"),
            };
            let Some(content) = req.body["content"].as_str() else {
                return message(422, "Validation Failed");
            };
            let reaction = GhReaction {
                repo: format!("{o}/{r}"),
                target,
                content: content.to_owned(),
            };
            if s.reactions.contains(&reaction) {
                return reply(200, json!({"id": 1, "content": content}));
            }
            s.reactions.push(reaction);
            reply(201, json!({"id": s.reactions.len(), "content": content}))
        }
        _ => message(404, "Not Found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(1_468_275_250), "2016-07-11T22:14:10Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
