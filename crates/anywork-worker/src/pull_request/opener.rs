//! [`TaskPullRequests`]: the tool's work (commit, push, API call).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anywork_core::executor::validate_branch;
use anywork_core::{
    Error, ErrorKind, OpenPullRequest, PullRequestLink, PullRequestOpener, Result, SessionId,
    TaskId, spec::McpServerConfig,
};
use serde_json::{Value, json};

use crate::git::git_output;
use crate::state::SessionRepo;

/// Who the worker's commits are by.
const COMMITTER_NAME: &str = "AnyWork";
const COMMITTER_EMAIL: &str = "anywork@users.noreply.github.com";

/// One task's pull-request tool. See the [module docs](self).
pub struct TaskPullRequests {
    repo: SessionRepo,
    session: SessionId,
    task: TaskId,
    http: reqwest::Client,
    opened: Arc<Mutex<Vec<PullRequestLink>>>,
    /// One at a time.
    busy: tokio::sync::Mutex<()>,
    /// The MCP endpoint and its secret, for executors that take MCP servers.
    mcp: Option<(String, String)>,
}

impl std::fmt::Debug for TaskPullRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskPullRequests")
            .field("repo", &self.repo.checkout)
            .field("task", &self.task)
            .finish_non_exhaustive()
    }
}

impl TaskPullRequests {
    /// The tool of `task` for `repo`, or `None` when the checkout has no token or no target.
    /// Pull requests it opens are added to `opened`. `mcp`: the endpoint URL and the secret
    /// that calls it.
    pub(crate) fn new(
        repo: SessionRepo,
        session: SessionId,
        task: TaskId,
        opened: Arc<Mutex<Vec<PullRequestLink>>>,
        mcp: Option<(String, String)>,
    ) -> Option<Self> {
        let has_token = repo
            .checkout
            .token
            .as_deref()
            .is_some_and(|t| !t.is_empty());
        if !has_token || repo.checkout.pull_requests.is_none() {
            return None;
        }
        Some(Self {
            repo,
            session,
            task,
            http: reqwest::Client::builder()
                .user_agent(concat!("anywork-worker/", env!("CARGO_PKG_VERSION")))
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            opened,
            busy: tokio::sync::Mutex::new(()),
            mcp,
        })
    }

    /// The branch name when the agent gives none: `anywork/<session>-<task>[-n]`.
    fn default_branch(&self, n: usize) -> String {
        let mut slug: String = self
            .session
            .as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        while slug.contains("--") {
            slug = slug.replace("--", "-");
        }
        let slug: String = slug.trim_matches('-').chars().take(40).collect();
        let slug = slug.trim_end_matches('-');
        let task: String = self
            .task
            .to_string()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let mut name = if slug.is_empty() {
            format!("anywork/{task}")
        } else {
            format!("anywork/{slug}-{task}")
        };
        if n > 0 {
            name.push_str(&format!("-{}", n + 1));
        }
        name
    }

    async fn open_locked(&self, request: OpenPullRequest) -> Result<PullRequestLink> {
        request.validate()?;
        let checkout = &self.repo.checkout;
        let (Some(token), Some(target)) = (checkout.token.as_deref(), &checkout.pull_requests)
        else {
            return Err(Error::invalid_input(
                "this task's repository has no credentials to open pull requests with",
            ));
        };
        let n = self.opened.lock().unwrap_or_else(|e| e.into_inner()).len();
        let branch = match request.branch.as_deref().map(str::trim) {
            Some(b) => b.to_owned(),
            None => self.default_branch(n),
        };
        validate_branch(&branch)?;
        if branch == target.base {
            return Err(Error::invalid_input(format!(
                "the branch must be a new one, not the base `{}`",
                target.base
            )));
        }
        let title = request.title.trim().to_owned();
        let body = request.body.clone().unwrap_or_default();

        let private = PrivateRepo::create(&self.task, n).await?;
        let commit = private
            .commit(
                &self.repo.dir,
                &self.repo.base,
                &title,
                &body,
                &checkout.dir,
            )
            .await?;
        private
            .push(&checkout.url, token, &commit, &branch)
            .await
            .map_err(|e| {
                let m = e.message();
                if m.contains("stale info") || m.contains("already exists") {
                    Error::conflict(format!(
                        "the branch `{branch}` already exists in the repository: give another \
                         name (the tool only creates new branches)"
                    ))
                } else {
                    e
                }
            })?;
        drop(private);

        let link = self
            .create(token, target, &branch, &title, &body, request.draft)
            .await?;
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(link.clone());
        tracing::info!(task = %self.task, number = link.number, url = %link.url, branch = %branch, "opened a pull request");
        Ok(link)
    }

    /// `POST {api}/repos/{repo}/pulls`.
    async fn create(
        &self,
        token: &str,
        target: &anywork_core::worker_api::PullRequestTarget,
        branch: &str,
        title: &str,
        body: &str,
        draft: bool,
    ) -> Result<PullRequestLink> {
        let url = format!(
            "{}/repos/{}/pulls",
            target.api_url.trim_end_matches('/'),
            target.repository
        );
        let payload = json!({
            "title": title,
            "head": branch,
            "base": target.base,
            "body": body,
            "draft": draft,
        });
        let what = format!("POST /repos/{}/pulls", target.repository);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
            .json(&payload)
            .send()
            .await
            .map_err(|e| {
                Error::unavailable(format!(
                    "the branch `{branch}` is pushed, but {what} failed: {}",
                    scrub(&e.without_url().to_string(), token)
                ))
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let mut detail = v["message"].as_str().unwrap_or("").to_owned();
            if let Some(errors) = v["errors"].as_array() {
                for e in errors {
                    if let Some(m) = e["message"].as_str() {
                        detail.push_str(&format!("; {m}"));
                    }
                }
            }
            let hint = match status.as_u16() {
                401 | 403 | 404 => {
                    " (the token must be allowed to write contents and pull requests: for a \
                     GitHub App, contents: write and pull_requests: write)"
                }
                _ => "",
            };
            return Err(Error::new(
                if status.is_client_error() {
                    ErrorKind::InvalidInput
                } else {
                    ErrorKind::Unavailable
                },
                format!(
                    "the branch `{branch}` is pushed, but GitHub refused the pull request \
                     ({what}: {status}): {}{hint}",
                    scrub(detail.trim(), token)
                ),
            ));
        }
        let (Some(number), Some(html)) = (v["number"].as_u64(), v["html_url"].as_str()) else {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("{what} answered without a number and html_url"),
            ));
        };
        Ok(PullRequestLink {
            repository: target.repository.clone(),
            number,
            url: html.to_owned(),
            branch: branch.to_owned(),
            base: target.base.clone(),
        })
    }
}

#[async_trait::async_trait]
impl PullRequestOpener for TaskPullRequests {
    async fn open(&self, request: OpenPullRequest) -> Result<PullRequestLink> {
        let _one = self.busy.lock().await;
        self.open_locked(request).await
    }

    fn folder(&self) -> &str {
        &self.repo.checkout.dir
    }

    fn mcp_server(&self) -> Option<McpServerConfig> {
        let (url, secret) = self.mcp.clone()?;
        Some(McpServerConfig::Http {
            url,
            headers: [("Authorization".to_owned(), format!("Bearer {secret}"))].into(),
        })
    }
}

fn scrub(text: &str, token: &str) -> String {
    if token.is_empty() {
        text.to_owned()
    } else {
        text.replace(token, "[redacted]")
    }
}

/// A git directory of the worker's own, outside the workspace; removed when dropped.
struct PrivateRepo {
    dir: PathBuf,
}

impl Drop for PrivateRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateRepo {
    async fn create(task: &TaskId, n: usize) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("anywork-pr-{task}-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create a git directory: {e}")))?;
        let this = Self { dir };
        this.git(
            &this.dir,
            &["init", "-q", "--bare", "--template=", "."],
            None,
        )
        .await?;
        Ok(this)
    }

    fn env(&self) -> Vec<(&'static str, &OsStr)> {
        vec![
            ("GIT_DIR", self.dir.as_os_str()),
            ("GIT_CONFIG_GLOBAL", OsStr::new("/dev/null")),
            ("GIT_AUTHOR_NAME", OsStr::new(COMMITTER_NAME)),
            ("GIT_AUTHOR_EMAIL", OsStr::new(COMMITTER_EMAIL)),
            ("GIT_COMMITTER_NAME", OsStr::new(COMMITTER_NAME)),
            ("GIT_COMMITTER_EMAIL", OsStr::new(COMMITTER_EMAIL)),
        ]
    }

    async fn git(&self, cwd: &Path, args: &[&str], token: Option<&str>) -> Result<String> {
        git_output(cwd, args, token, &self.env()).await
    }

    /// Commits the working tree of `worktree` on top of `base`; answers the commit.
    async fn commit(
        &self,
        worktree: &Path,
        base: &str,
        title: &str,
        body: &str,
        folder: &str,
    ) -> Result<String> {
        let objects = worktree.join(".git").join("objects");
        if !objects.is_dir() {
            return Err(Error::invalid_input(format!(
                "`{folder}` is no longer the repository checkout (its .git folder is gone)"
            )));
        }
        let info = self.dir.join("objects").join("info");
        let write = |path: PathBuf, text: String| {
            std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|e| Error::internal(format!("cannot set up the git directory: {e}")))
        };
        write(
            info.join("alternates"),
            format!("{}\n", objects.to_string_lossy()),
        )?;
        // The checkout is shallow: its commit's parents are not there.
        write(self.dir.join("shallow"), format!("{base}\n"))?;
        let wt = worktree.as_os_str().to_string_lossy().into_owned();
        let work_tree = format!("--work-tree={wt}");
        self.git(&self.dir, &[&work_tree, "read-tree", base], None)
            .await
            .map_err(|e| {
                Error::invalid_input(format!(
                    "the checkout's commit is gone from `{folder}`: {}",
                    e.message()
                ))
            })?;
        self.git(&self.dir, &[&work_tree, "add", "-A"], None)
            .await?;
        let changed = self
            .git(
                &self.dir,
                &["diff-index", "--cached", "--name-only", base],
                None,
            )
            .await?;
        if changed.trim().is_empty() {
            return Err(Error::invalid_input(format!(
                "there are no changes in `{folder}` to propose: edit the files there first"
            )));
        }
        let tree = self.git(&self.dir, &["write-tree"], None).await?;
        let message = if body.trim().is_empty() {
            title.to_owned()
        } else {
            format!("{title}\n\n{}", body.trim())
        };
        let commit = self
            .git(
                &self.dir,
                &["commit-tree", tree.trim(), "-p", base, "-m", &message],
                None,
            )
            .await?;
        Ok(commit.trim().to_owned())
    }

    /// Pushes `commit` as the new branch `branch` of `url`.
    async fn push(&self, url: &str, token: &str, commit: &str, branch: &str) -> Result<()> {
        let lease = format!("--force-with-lease=refs/heads/{branch}:");
        let refspec = format!("{commit}:refs/heads/{branch}");
        self.git(
            &self.dir,
            &["push", "-q", "--no-verify", &lease, url, &refspec],
            Some(token),
        )
        .await
        .map(|_| ())
    }
}
