//! GitHub: an issue or pull-request comment that mentions the trigger (`@anywork`) becomes a
//! task; the answer comes back as a comment.
//!
//! Point a repository's (or an app's) webhook at `/api/channel/github/webhook` with content
//! type `application/json`, the secret in `GITHUB_WEBHOOK_SECRET`, and the events *Issues*,
//! *Issue comments* and *Pull request review comments*.
//!
//! - Verification: `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>`.
//! - `ping` → [`Inbound::Skip`] (200).
//! - `issue_comment` (created), `issues` (opened) and `pull_request_review_comment` (created)
//!   whose text mentions the trigger → [`Inbound::Task`] in the session of
//!   `owner/repo#number` (`channel_key`); the issue's or pull request's title and
//!   description (and the diff hunk of a review comment) go into the message as context.
//!   A comment without the trigger → [`Inbound::AnswerOnly`]: it answers a question the
//!   agent asked there, else nothing happens.
//! - Ignored (no loops): comments by bots (`type: Bot`, `…[bot]`, `GITHUB_BOT_LOGIN`) and any
//!   comment carrying AnyWork's marker; edits and deletions.
//! - `X-GitHub-Delivery` is the idempotency key: a redelivered event runs once.
//!
//! What the hooks do, through the REST API (`GITHUB_API_URL`): [`Channel::on_accepted`] puts
//! 👀 on the comment (or issue); [`Channel::on_started`] posts "⏳ Working on it…";
//! [`Channel::on_input_required`] posts the question; [`Channel::deliver`] edits the
//! placeholder into the answer (or posts it below a question). Review comments are answered
//! in their review thread. Each comment carries a hidden marker
//! `<!-- anywork:task=<id> kind=<status|question|result> -->` by which the channel finds it
//! again after a retry or a restart, so nothing is posted twice.
//!
//! Credentials: `GITHUB_TOKEN`, or a GitHub App (`GITHUB_APP_ID` and
//! `GITHUB_APP_PRIVATE_KEY` or `GITHUB_APP_PRIVATE_KEY_FILE`): the installation comes from
//! the event (`installation.id`), else `GITHUB_APP_INSTALLATION_ID`, else the repository's
//! installation; its token is cached until 5 minutes before it expires.

mod app;

use anywork_core::channel::{Channel, Inbound, InboundRequest};
use anywork_core::worker_api::{PullRequestTarget, RepoCheckout};
use anywork_core::{Error, ErrorKind, InputRequest, Result, Task, TaskOutcome, TaskRequest};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

pub use app::AppKey;
use app::TokenCache;

use crate::posts::{self, Memo, Own, PostKind};
use crate::text::{mention_ranges, strip_mentions, truncate};
use crate::{api, time, verify};

/// The channel type, as in `/api/channel/github/webhook`.
pub const CHANNEL_TYPE: &str = "github";
/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The event name header.
pub const EVENT_HEADER: &str = "x-github-event";
/// The delivery id header (the idempotency key).
pub const DELIVERY_HEADER: &str = "x-github-delivery";
/// The start of the hidden marker in every comment the channel writes.
pub const MARKER_PREFIX: &str = "<!-- anywork:task=";
/// GitHub's limit on a comment is 65,536 characters; answers are cut below it.
const MAX_COMMENT_BYTES: usize = 60_000;

/// How the channel authenticates to the REST API.
#[derive(Clone)]
pub enum GithubAuth {
    /// A personal access token or any token with `issues: write` / `pull_requests: write`.
    Token(String),
    /// A GitHub App.
    App {
        /// The app id (or client id): the JWT's `iss`.
        app_id: String,
        /// Its private key.
        key: AppKey,
        /// The installation to use when the event does not name one.
        installation_id: Option<u64>,
    },
}

impl std::fmt::Debug for GithubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GithubAuth::Token(_) => f.write_str("Token(<secret>)"),
            GithubAuth::App {
                app_id,
                installation_id,
                ..
            } => f
                .debug_struct("App")
                .field("app_id", app_id)
                .field("installation_id", installation_id)
                .finish_non_exhaustive(),
        }
    }
}

/// Settings of the GitHub channel.
#[derive(Clone)]
pub struct GithubConfig {
    /// `GITHUB_WEBHOOK_SECRET`: the webhook's secret.
    pub webhook_secret: String,
    /// `GITHUB_TOKEN`, or `GITHUB_APP_ID` + `GITHUB_APP_PRIVATE_KEY[_FILE]`
    /// (+ `GITHUB_APP_INSTALLATION_ID`).
    pub auth: GithubAuth,
    /// `GITHUB_TRIGGER`: the mention that asks the agent (default `@anywork`).
    pub trigger: String,
    /// `GITHUB_API_URL`: the REST API's base URL (default `https://api.github.com`; a GitHub
    /// Enterprise Server's is `https://HOST/api/v3`).
    pub api_url: String,
    /// `GITHUB_BOT_LOGIN`: the login the channel comments as, whose comments are ignored
    /// (an app's `name[bot]` is ignored anyway).
    pub bot_login: Option<String>,
    /// Largest body accepted, in bytes (GitHub caps payloads at 25 MB; 1 MiB by default).
    pub max_body_bytes: usize,
    /// `GITHUB_CHECKOUT`: check the repository out in the session's workspace before each
    /// task (default `true`).
    pub checkout: bool,
}

impl std::fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubConfig")
            .field("webhook_secret", &"<secret>")
            .field("auth", &self.auth)
            .field("trigger", &self.trigger)
            .field("api_url", &self.api_url)
            .field("bot_login", &self.bot_login)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("checkout", &self.checkout)
            .finish()
    }
}

impl GithubConfig {
    /// The default trigger.
    pub const DEFAULT_TRIGGER: &'static str = "@anywork";
    /// The default API.
    pub const DEFAULT_API_URL: &'static str = "https://api.github.com";

    /// A configuration with the defaults.
    pub fn new(webhook_secret: impl Into<String>, auth: GithubAuth) -> Self {
        Self {
            webhook_secret: webhook_secret.into(),
            auth,
            trigger: Self::DEFAULT_TRIGGER.into(),
            api_url: Self::DEFAULT_API_URL.into(),
            bot_login: None,
            max_body_bytes: 1 << 20,
            checkout: true,
        }
    }

    /// Reads the `GITHUB_*` variables through `var`. `Ok(None)` when none of
    /// `GITHUB_WEBHOOK_SECRET`, `GITHUB_TOKEN`, `GITHUB_APP_ID` is set (the channel is off);
    /// an error naming what is missing when it is half configured. Reads the key file of
    /// `GITHUB_APP_PRIVATE_KEY_FILE`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let (secret, token, app_id) = (
            set("GITHUB_WEBHOOK_SECRET"),
            set("GITHUB_TOKEN"),
            set("GITHUB_APP_ID"),
        );
        if secret.is_none() && token.is_none() && app_id.is_none() {
            return Ok(None);
        }
        let secret = secret.ok_or_else(|| {
            Error::invalid_input(
                "GITHUB_WEBHOOK_SECRET is not set: set it to the secret of the repository's or \
                 app's webhook (the GitHub channel refuses unsigned events)",
            )
        })?;
        let auth = match (token, app_id) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid_input(
                    "both GITHUB_TOKEN and GITHUB_APP_ID are set: keep one",
                ));
            }
            (Some(token), None) => GithubAuth::Token(token.trim().to_owned()),
            (None, Some(app_id)) => {
                let pem = match (
                    set("GITHUB_APP_PRIVATE_KEY"),
                    set("GITHUB_APP_PRIVATE_KEY_FILE"),
                ) {
                    (Some(pem), _) => pem,
                    (None, Some(path)) => std::fs::read_to_string(path.trim()).map_err(|e| {
                        Error::invalid_input(format!(
                            "GITHUB_APP_PRIVATE_KEY_FILE {path:?} cannot be read: {e}"
                        ))
                    })?,
                    (None, None) => {
                        return Err(Error::invalid_input(
                            "GITHUB_APP_ID is set without a key: set GITHUB_APP_PRIVATE_KEY_FILE \
                             to the app's .pem file (or GITHUB_APP_PRIVATE_KEY to its text)",
                        ));
                    }
                };
                let installation_id = match set("GITHUB_APP_INSTALLATION_ID") {
                    Some(v) => Some(v.trim().parse().map_err(|_| {
                        Error::invalid_input(format!(
                            "GITHUB_APP_INSTALLATION_ID={v:?}: use the number in the \
                             installation's settings URL"
                        ))
                    })?),
                    None => None,
                };
                GithubAuth::App {
                    app_id: app_id.trim().to_owned(),
                    key: AppKey::from_pem(&pem)?,
                    installation_id,
                }
            }
            (None, None) => {
                return Err(Error::invalid_input(
                    "the GitHub channel needs credentials to answer: set GITHUB_TOKEN, or \
                     GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY_FILE",
                ));
            }
        };
        let mut c = Self::new(secret, auth);
        if let Some(t) = set("GITHUB_TRIGGER") {
            c.trigger = t.trim().to_owned();
        }
        if let Some(u) = set("GITHUB_API_URL") {
            let u = u.trim().trim_end_matches('/').to_owned();
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(Error::invalid_input(format!(
                    "GITHUB_API_URL={u:?}: use an http(s) URL such as https://api.github.com"
                )));
            }
            c.api_url = u;
        }
        c.bot_login = set("GITHUB_BOT_LOGIN").map(|l| l.trim().to_owned());
        if let Some(v) = set("GITHUB_CHECKOUT") {
            c.checkout = crate::config::parse_bool("GITHUB_CHECKOUT", &v)?;
        }
        Ok(Some(c))
    }
}

/// The GitHub channel. See the [module docs](self).
pub struct GithubChannel {
    config: GithubConfig,
    http: reqwest::Client,
    tokens: TokenCache,
    posts: Memo<u64>,
}

impl std::fmt::Debug for GithubChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubChannel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

// What the channel reads of GitHub's payloads; every field optional so that an odd payload
// is a clear error (or a skip), never a panic.
#[derive(Deserialize)]
struct Payload {
    action: Option<String>,
    repository: Option<Repo>,
    issue: Option<Issue>,
    comment: Option<Comment>,
    pull_request: Option<Issue>,
    installation: Option<Installation>,
}

#[derive(Deserialize)]
struct Repo {
    full_name: String,
    clone_url: Option<String>,
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct Issue {
    number: u64,
    title: Option<String>,
    body: Option<String>,
    html_url: Option<String>,
    user: Option<User>,
    /// Present (an object) when an issue is a pull request.
    pull_request: Option<Value>,
    head: Option<GitRef>,
    base: Option<GitRef>,
}

#[derive(Deserialize)]
struct GitRef {
    #[serde(rename = "ref")]
    name: Option<String>,
    sha: Option<String>,
}

#[derive(Deserialize)]
struct Comment {
    id: u64,
    body: Option<String>,
    user: Option<User>,
    html_url: Option<String>,
    path: Option<String>,
    line: Option<u64>,
    diff_hunk: Option<String>,
    in_reply_to_id: Option<u64>,
}

#[derive(Deserialize)]
struct User {
    login: String,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Installation {
    id: u64,
}

/// Where a task's comments go.
#[derive(Debug, Clone, PartialEq)]
enum Thread {
    /// The issue's (or pull request's) conversation.
    Issue,
    /// A review comment thread of a pull request, by its first comment's id.
    Review(u64),
}

/// What `deliver` and the hooks need, read back from `channel_meta`.
#[derive(Debug)]
struct Target {
    repo: String,
    number: u64,
    thread: Thread,
    /// The comment that asked (for the 👀 reaction); `None` for an opened issue.
    comment_id: Option<u64>,
    installation_id: Option<u64>,
}

impl Target {
    fn from_meta(meta: &Value) -> Result<Self> {
        let bad = || {
            Error::invalid_input(
                "the task has no GitHub target in its channel_meta (repo, number): it did not \
                 come from the GitHub channel",
            )
        };
        let repo = meta["repo"].as_str().ok_or_else(bad)?.to_owned();
        check_repo(&repo)?;
        Ok(Self {
            repo,
            number: meta["number"].as_u64().ok_or_else(bad)?,
            thread: match meta["review_thread_id"].as_u64() {
                Some(id) => Thread::Review(id),
                None => Thread::Issue,
            },
            comment_id: meta["comment_id"].as_u64(),
            installation_id: meta["installation_id"].as_u64(),
        })
    }
}

/// `owner/name` of plain characters, so that it is safe in a URL path.
fn check_repo(repo: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match repo.split_once('/') {
        Some((owner, name)) if part_ok(owner) && part_ok(name) => Ok(()),
        _ => Err(Error::invalid_input(format!(
            "repository {:?} is not owner/name",
            truncate(repo, 200, "…")
        ))),
    }
}

fn is_bot(user: Option<&User>, bot_login: Option<&str>) -> bool {
    user.is_some_and(|u| {
        u.kind.as_deref() == Some("Bot")
            || u.login.ends_with("[bot]")
            || bot_login.is_some_and(|b| b.eq_ignore_ascii_case(&u.login))
    })
}

fn marker(task: &Task, kind: PostKind, request: Option<&str>) -> String {
    match request.and_then(posts::marker_safe) {
        Some(r) => format!(
            "{MARKER_PREFIX}{} kind={} request={r} -->",
            task.id,
            kind.as_str()
        ),
        None => format!("{MARKER_PREFIX}{} kind={} -->", task.id, kind.as_str()),
    }
}

/// The marker of `task` in a comment body, if there is one.
fn find_marker(body: &str, task: &Task) -> Option<(PostKind, Option<String>)> {
    let start = body.rfind(&format!("{MARKER_PREFIX}{} ", task.id))?;
    let rest = &body[start + MARKER_PREFIX.len()..];
    let inner = &rest[..rest.find("-->")?];
    let mut kind = None;
    let mut request = None;
    for part in inner.split_whitespace() {
        if let Some(k) = part.strip_prefix("kind=") {
            kind = PostKind::parse(k);
        } else if let Some(r) = part.strip_prefix("request=") {
            request = Some(r.to_owned());
        }
    }
    Some((kind?, request))
}

impl GithubChannel {
    /// A GitHub channel with `config`.
    pub fn new(config: GithubConfig) -> Self {
        Self {
            config,
            http: api::client(),
            tokens: TokenCache::default(),
            posts: Memo::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GithubConfig {
        &self.config
    }

    /// [`Channel::parse`] with the clock given (Unix seconds; GitHub signs no timestamp, so
    /// it is unused): verification, then parsing. Never does I/O.
    pub fn parse_at(&self, request: &InboundRequest, _now: i64) -> Result<Inbound> {
        verify::check_size(&request.body, self.config.max_body_bytes)?;
        self.verify(request)?;
        self.parse_verified(request)
    }

    /// Checks `X-Hub-Signature-256` against the raw body.
    pub fn verify(&self, request: &InboundRequest) -> Result<()> {
        let header = request.header(SIGNATURE_HEADER).ok_or_else(|| {
            Error::unauthorized(
                "missing X-Hub-Signature-256: give the webhook a secret in GitHub, the same \
                 as GITHUB_WEBHOOK_SECRET",
            )
        })?;
        let hex = header.trim().strip_prefix("sha256=").unwrap_or("");
        if verify::hmac_sha256_matches(self.config.webhook_secret.as_bytes(), &[&request.body], hex)
        {
            Ok(())
        } else {
            Err(Error::unauthorized(
                "X-Hub-Signature-256 does not match the body: the webhook's secret in GitHub \
                 must equal GITHUB_WEBHOOK_SECRET",
            ))
        }
    }

    fn parse_verified(&self, request: &InboundRequest) -> Result<Inbound> {
        let event = request
            .header(EVENT_HEADER)
            .ok_or_else(|| Error::invalid_input("missing X-GitHub-Event header"))?
            .trim()
            .to_owned();
        let skip = |reason: String| Ok(Inbound::Skip { reason });
        if event == "ping" {
            return skip("ping".into());
        }
        if !matches!(
            event.as_str(),
            "issue_comment" | "issues" | "pull_request_review_comment"
        ) {
            return skip(format!(
                "GitHub event {:?} is not handled",
                truncate(&event, 64, "…")
            ));
        }
        if request.body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::invalid_input(format!(
                "the {event} payload is not a JSON object: set the webhook's content type to \
                 application/json"
            )));
        }
        let payload: Payload = serde_json::from_slice(&request.body).map_err(|e| {
            Error::invalid_input(format!("the {event} payload is not what GitHub sends: {e}"))
        })?;
        let action = payload.action.as_deref().unwrap_or("");
        let wanted = if event == "issues" {
            "opened"
        } else {
            "created"
        };
        if action != wanted {
            return skip(format!(
                "{event} action {:?} is not handled",
                truncate(action, 64, "…")
            ));
        }
        let repo = payload.repository.ok_or_else(|| {
            Error::invalid_input(format!("the {event} payload has no repository"))
        })?;
        check_repo(&repo.full_name)?;
        let bot_login = self.config.bot_login.as_deref();
        let trigger = self.config.trigger.as_str();

        // The issue or pull request, and the text that may mention the trigger.
        let (issue, is_pr, text, author, comment, review_thread_id) = match event.as_str() {
            "issues" => {
                let issue = payload
                    .issue
                    .ok_or_else(|| Error::invalid_input("the issues payload has no issue"))?;
                let text = format!(
                    "{}\n\n{}",
                    issue.title.as_deref().unwrap_or(""),
                    issue.body.as_deref().unwrap_or("")
                );
                if is_bot(issue.user.as_ref(), bot_login) || text.contains(MARKER_PREFIX) {
                    return skip("an issue opened by a bot".into());
                }
                let author = issue.user.as_ref().map(|u| u.login.clone());
                let is_pr = issue.pull_request.is_some();
                (issue, is_pr, text, author, None, None)
            }
            _ => {
                let comment = payload.comment.ok_or_else(|| {
                    Error::invalid_input(format!("the {event} payload has no comment"))
                })?;
                let body = comment.body.clone().unwrap_or_default();
                if is_bot(comment.user.as_ref(), bot_login) || body.contains(MARKER_PREFIX) {
                    return skip("a comment by a bot (or by AnyWork itself)".into());
                }
                let (issue, is_pr, thread) = if event == "issue_comment" {
                    let issue = payload.issue.ok_or_else(|| {
                        Error::invalid_input("the issue_comment payload has no issue")
                    })?;
                    let is_pr = issue.pull_request.is_some();
                    (issue, is_pr, None)
                } else {
                    let pr = payload.pull_request.ok_or_else(|| {
                        Error::invalid_input(
                            "the pull_request_review_comment payload has no pull_request",
                        )
                    })?;
                    (pr, true, Some(comment.in_reply_to_id.unwrap_or(comment.id)))
                };
                let author = comment.user.as_ref().map(|u| u.login.clone());
                (issue, is_pr, body, author, Some(comment), thread)
            }
        };

        let mentioned = !mention_ranges(&text, trigger).is_empty();
        if !mentioned && event == "issues" {
            return skip(format!("the issue does not mention {trigger}"));
        }
        let key = format!("{}#{}", repo.full_name, issue.number);
        let mut meta = json!({
            "event": event,
            "repo": repo.full_name,
            "number": issue.number,
            "pull_request": is_pr,
            "url": comment.as_ref().and_then(|c| c.html_url.clone()).or(issue.html_url.clone()),
            "sender": author,
        });
        let obj = meta
            .as_object_mut()
            .ok_or_else(|| Error::internal("meta is an object"))?;
        if let Some(c) = &comment {
            obj.insert("comment_id".into(), json!(c.id));
        }
        if let Some(t) = review_thread_id {
            obj.insert("review_thread_id".into(), json!(t));
        }
        if let Some(i) = &payload.installation {
            obj.insert("installation_id".into(), json!(i.id));
        }
        if let Some(u) = &repo.clone_url {
            obj.insert("clone_url".into(), json!(u));
        }
        if let Some(b) = &repo.default_branch {
            obj.insert("default_branch".into(), json!(b));
        }
        if let Some(head) = &issue.head {
            obj.insert("head_ref".into(), json!(head.name));
            obj.insert("head_sha".into(), json!(head.sha));
        }
        if let Some(name) = issue.base.as_ref().and_then(|b| b.name.as_ref()) {
            obj.insert("base_ref".into(), json!(name));
        }

        let own_words = strip_mentions(&text, trigger);
        if own_words.is_empty() && !mentioned {
            return skip("an empty comment".into());
        }
        let message = if mentioned {
            compose(
                &repo.full_name,
                &issue,
                is_pr,
                author.as_deref(),
                &event,
                comment.as_ref(),
                &own_words,
            )
        } else {
            own_words.clone()
        };
        obj.insert("text".into(), json!(own_words));
        let mut task = TaskRequest::new(CHANNEL_TYPE, message);
        task.channel_key = Some(key);
        task.channel_meta = meta;
        task.idempotency_key = request
            .header(DELIVERY_HEADER)
            .map(str::trim)
            .filter(|d| !d.is_empty() && d.len() <= 200 && d.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned);
        task.validate_shape()?;
        Ok(if mentioned {
            Inbound::Task(Box::new(task))
        } else {
            Inbound::AnswerOnly(Box::new(task))
        })
    }

    // ---- REST API ----

    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.config.api_url);
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let mut req = self
            .http
            .request(method, &url)
            .header("authorization", format!("Bearer {auth}"))
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28");
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| api::network_error("GitHub", &what, &e.without_url()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| api::network_error("GitHub", &what, &e.without_url()))?;
        if (200..300).contains(&status) {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let hint = match self.config.auth {
            GithubAuth::Token(_) => {
                "check GITHUB_TOKEN: it must be valid and allowed to write issues and pull requests"
            }
            GithubAuth::App { .. } => {
                "check the GitHub App: its id, its private key, and that it is installed on the \
                 repository with issues and pull requests write permission"
            }
        };
        Err(api::status_error(
            "GitHub",
            &what,
            status,
            &headers,
            &detail,
            hint,
            verify::unix_now(),
        ))
    }

    /// The token to call the API with for `target`.
    async fn token(&self, target: &Target) -> Result<String> {
        let (app_id, key, default_installation) = match &self.config.auth {
            GithubAuth::Token(t) => return Ok(t.clone()),
            GithubAuth::App {
                app_id,
                key,
                installation_id,
            } => (app_id, key, *installation_id),
        };
        let now = verify::unix_now();
        let jwt = || key.jwt(app_id, now);
        let installation = match target.installation_id.or(default_installation) {
            Some(id) => id,
            None => {
                let v = self
                    .call(
                        Method::GET,
                        &format!("/repos/{}/installation", target.repo),
                        &jwt()?,
                        None,
                    )
                    .await?;
                v["id"].as_u64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Protocol,
                        "GitHub's installation answer has no id",
                    )
                })?
            }
        };
        if let Some(t) = self.tokens.get(installation, now) {
            return Ok(t);
        }
        let v = self
            .call(
                Method::POST,
                &format!("/app/installations/{installation}/access_tokens"),
                &jwt()?,
                None,
            )
            .await?;
        let token = v["token"].as_str().ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "GitHub's access token answer has no token",
            )
        })?;
        // Without a readable expiry, assume GitHub's one hour.
        let expires = v["expires_at"]
            .as_str()
            .and_then(time::parse_rfc3339)
            .unwrap_or(now + 3600);
        self.tokens.put(installation, token.to_owned(), expires);
        Ok(token.to_owned())
    }

    fn comments_path(target: &Target) -> String {
        match target.thread {
            Thread::Issue => format!("/repos/{}/issues/{}/comments", target.repo, target.number),
            Thread::Review(_) => format!("/repos/{}/pulls/{}/comments", target.repo, target.number),
        }
    }

    fn edit_path(target: &Target, id: u64) -> String {
        match target.thread {
            Thread::Issue => format!("/repos/{}/issues/comments/{id}", target.repo),
            Thread::Review(_) => format!("/repos/{}/pulls/comments/{id}", target.repo),
        }
    }

    /// The task's latest comment: remembered, else searched among the comments made since
    /// the task was created.
    async fn latest(&self, task: &Task, target: &Target, token: &str) -> Result<Option<Own<u64>>> {
        if let Some(own) = self.posts.get(task.id) {
            return Ok(Some(own));
        }
        let since = time::format_rfc3339(task.created_at.as_secs() - 300);
        let mut latest: Option<Own<u64>> = None;
        for page in 1..=10 {
            let path = format!(
                "{}?since={since}&per_page=100&page={page}",
                Self::comments_path(target)
            );
            let v = self.call(Method::GET, &path, token, None).await?;
            let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
            for c in items {
                let (Some(id), Some(body)) = (c["id"].as_u64(), c["body"].as_str()) else {
                    continue;
                };
                if let Some((kind, request)) = find_marker(body, task)
                    && latest.as_ref().is_none_or(|l| id > l.id)
                {
                    latest = Some(Own { id, kind, request });
                }
            }
            if items.len() < 100 {
                break;
            }
        }
        if let Some(own) = &latest {
            self.posts.set(task.id, own.clone());
        }
        Ok(latest)
    }

    /// Posts a comment in the task's thread and remembers it.
    async fn post(
        &self,
        task: &Task,
        target: &Target,
        token: &str,
        body: String,
        kind: PostKind,
        request: Option<&str>,
    ) -> Result<()> {
        let (path, payload) = match target.thread {
            Thread::Issue => (Self::comments_path(target), json!({"body": body})),
            Thread::Review(root) => (
                format!(
                    "/repos/{}/pulls/{}/comments/{root}/replies",
                    target.repo, target.number
                ),
                json!({"body": body}),
            ),
        };
        let v = self
            .call(Method::POST, &path, token, Some(&payload))
            .await?;
        if let Some(id) = v["id"].as_u64() {
            self.posts.set(
                task.id,
                Own {
                    id,
                    kind,
                    request: request.map(str::to_owned),
                },
            );
        }
        Ok(())
    }

    async fn edit(
        &self,
        task: &Task,
        target: &Target,
        token: &str,
        id: u64,
        body: String,
        kind: PostKind,
    ) -> Result<()> {
        self.call(
            Method::PATCH,
            &Self::edit_path(target, id),
            token,
            Some(&json!({"body": body})),
        )
        .await?;
        self.posts.set(
            task.id,
            Own {
                id,
                kind,
                request: None,
            },
        );
        Ok(())
    }
}

/// The agent's message for a mention: who asked where, the issue's or pull request's
/// description (and the diff hunk of a review comment), then the request itself.
fn compose(
    repo: &str,
    issue: &Issue,
    is_pr: bool,
    author: Option<&str>,
    event: &str,
    comment: Option<&Comment>,
    request: &str,
) -> String {
    let what = if is_pr { "pull request" } else { "issue" };
    let who = author
        .map(|a| format!("@{a}"))
        .unwrap_or_else(|| "someone".into());
    let title = issue.title.as_deref().unwrap_or("").trim();
    let mut m = if event == "issues" {
        format!(
            "{who} opened GitHub {what} {repo}#{} and mentioned you.",
            issue.number
        )
    } else {
        format!(
            "{who} mentioned you in a comment on GitHub {what} {repo}#{}.",
            issue.number
        )
    };
    if let Some(url) = comment
        .and_then(|c| c.html_url.as_deref())
        .or(issue.html_url.as_deref())
    {
        m.push_str(&format!(" ({url})"));
    }
    if event != "issues" {
        m.push_str(&format!("\n\nTitle: {title}"));
        let body = issue.body.as_deref().unwrap_or("").trim();
        if !body.is_empty() {
            m.push_str("\n\nDescription:\n");
            m.push_str(&truncate(body, 4000, "\n…(cut)"));
        }
    }
    if let Some(c) = comment.filter(|_| event == "pull_request_review_comment") {
        m.push_str(&format!(
            "\n\nThe comment is on {} line {}:\n```diff\n{}\n```",
            c.path.as_deref().unwrap_or("?"),
            c.line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
            truncate(c.diff_hunk.as_deref().unwrap_or(""), 3000, "\n…(cut)")
        ));
    }
    m.push_str("\n\nRequest:\n");
    m.push_str(if request.is_empty() {
        "(no words besides the mention: read the above and help)"
    } else {
        request
    });
    m
}

#[async_trait::async_trait]
impl Channel for GithubChannel {
    fn channel_type(&self) -> &str {
        CHANNEL_TYPE
    }

    async fn parse(&self, request: InboundRequest) -> Result<Inbound> {
        self.parse_at(&request, verify::unix_now())
    }

    /// 👀 on the comment (or issue) that asked. GitHub answers an existing reaction with 200,
    /// so a repeat is harmless.
    async fn on_accepted(&self, task: &Task) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let token = self.token(&target).await?;
        let path = match (&target.thread, target.comment_id) {
            (Thread::Review(_), Some(id)) => {
                format!("/repos/{}/pulls/comments/{id}/reactions", target.repo)
            }
            (Thread::Issue, Some(id)) => {
                format!("/repos/{}/issues/comments/{id}/reactions", target.repo)
            }
            (_, None) => format!("/repos/{}/issues/{}/reactions", target.repo, target.number),
        };
        self.call(
            Method::POST,
            &path,
            &token,
            Some(&json!({"content": "eyes"})),
        )
        .await
        .map(|_| ())
    }

    async fn on_started(&self, task: &Task) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let token = self.token(&target).await?;
        let latest = self.latest(task, &target, &token).await?;
        if !posts::needs_placeholder(latest.as_ref()) {
            return Ok(());
        }
        let body = format!(
            "{}\n\n{}",
            posts::WORKING,
            marker(task, PostKind::Status, None)
        );
        self.post(task, &target, &token, body, PostKind::Status, None)
            .await
    }

    async fn on_input_required(&self, task: &Task, request: &InputRequest) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let token = self.token(&target).await?;
        let latest = self.latest(task, &target, &token).await?;
        let rid = posts::marker_safe(&request.request_id);
        if rid.is_some_and(|r| posts::question_posted(latest.as_ref(), r)) {
            return Ok(());
        }
        let text = posts::question_text(request, "in a comment here");
        let body = format!(
            "{}\n\n{}",
            truncate(&text, MAX_COMMENT_BYTES, "\n…(cut)"),
            marker(task, PostKind::Question, rid)
        );
        self.post(task, &target, &token, body, PostKind::Question, rid)
            .await
    }

    /// The issue's repository, checked out with the channel's token (or installation token):
    /// a pull request's head (`refs/pull/N/head`) for a pull request, else the default
    /// branch.
    async fn workspace_repository(&self, task: &Task) -> Result<Option<RepoCheckout>> {
        if !self.config.checkout {
            return Ok(None);
        }
        let meta = &task.channel_meta;
        let Some(url) = meta["clone_url"].as_str() else {
            return Ok(None);
        };
        let target = Target::from_meta(meta)?;
        let name = target.repo.rsplit('/').next().unwrap_or("repo");
        let mut dir: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        dir = dir.trim_start_matches(['-', '_']).to_owned();
        if dir.is_empty() {
            dir = "repo".into();
        }
        let mut checkout = RepoCheckout::new(url, dir);
        checkout.git_ref = if meta["pull_request"] == json!(true) {
            Some(format!("refs/pull/{}/head", target.number))
        } else {
            meta["default_branch"].as_str().map(str::to_owned)
        };
        if url.starts_with("https://") || url.starts_with("http://") {
            checkout.token = Some(self.token(&target).await?);
            // The agent may open pull requests with the same token: into the pull request's
            // base, else the default branch.
            let base = meta["base_ref"]
                .as_str()
                .or(meta["default_branch"].as_str())
                .filter(|b| anywork_core::executor::validate_branch(b).is_ok());
            if let Some(base) = base {
                checkout.pull_requests = Some(PullRequestTarget {
                    api_url: self.config.api_url.clone(),
                    repository: target.repo.clone(),
                    base: base.to_owned(),
                });
            }
        }
        Ok(Some(checkout))
    }

    async fn deliver(&self, task: &Task, outcome: &TaskOutcome) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let token = self.token(&target).await?;
        let note = format!(
            "\n\n…(cut: the whole answer is in AnyWork, task {})",
            task.id
        );
        // The links the worker reported come after the answer, never cut off with it.
        let mut text = truncate(&posts::outcome_text(outcome), MAX_COMMENT_BYTES, &note);
        for pr in outcome.pull_requests.iter().take(20) {
            text.push_str(&format!(
                "\n\nOpened pull request #{}: {}",
                pr.number,
                truncate(&pr.url, 300, "…")
            ));
        }
        let body = format!(
            "{}\n\n<sub>{}</sub>\n{}",
            text,
            posts::footer(task, outcome),
            marker(task, PostKind::Result, None)
        );
        let latest = self.latest(task, &target, &token).await?;
        match posts::result_target(latest.as_ref()) {
            Some(&id) => {
                match self
                    .edit(task, &target, &token, id, body.clone(), PostKind::Result)
                    .await
                {
                    // The placeholder was deleted meanwhile: post the answer instead.
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        self.post(task, &target, &token, body, PostKind::Result, None)
                            .await
                    }
                    other => other,
                }
            }
            None => {
                self.post(task, &target, &token, body, PostKind::Result, None)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_must_be_owner_slash_name() {
        assert!(check_repo("octo-org/hello_world.rs").is_ok());
        for bad in ["x", "a/b/c", "../x", "a/..", "a/b?c", "a /b", "/b", "a/"] {
            assert!(check_repo(bad).is_err(), "{bad}");
        }
    }
}
