//! The repository a task works in ([`RepoCheckout`] of `/prepare`): fetched shallowly (depth 1)
//! into a folder of the session's workspace and checked out, again before every task, so the
//! agent always starts from the ref it was asked about. Git runs with an empty environment
//! (no model keys), no prompts and a timeout; a token goes in an HTTP header through git's
//! environment-based configuration, never on the command line or into `.git/config`, and is
//! scrubbed from every error.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anywork_core::worker_api::RepoCheckout;
use anywork_core::{Error, ErrorKind, Result};

/// Longest time one git command may take.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Checks `repo` out in `workspace/<repo.dir>` (creating it), or refreshes it there; answers
/// the commit checked out.
pub async fn checkout(workspace: &Path, repo: &RepoCheckout) -> Result<String> {
    repo.validate()?;
    let dir = workspace.join(&repo.dir);
    if let Ok(meta) = std::fs::symlink_metadata(&dir)
        && !meta.is_dir()
    {
        return Err(Error::invalid_input(format!(
            "{} in the workspace is not a folder: the repository cannot be checked out there",
            repo.dir
        )));
    }
    if !dir.join(".git").is_dir() {
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::internal(format!(
                "cannot create the repository folder {}: {e}",
                repo.dir
            ))
        })?;
        git(&dir, &["init", "-q"], None).await?;
    }
    let target = repo.git_ref.as_deref().unwrap_or("HEAD");
    git(
        &dir,
        &[
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            &repo.url,
            target,
        ],
        repo.token.as_deref(),
    )
    .await?;
    git(
        &dir,
        &["checkout", "-q", "-f", "--detach", "FETCH_HEAD"],
        None,
    )
    .await?;
    let sha = git_output(&dir, &["rev-parse", "HEAD"], None, &[]).await?;
    Ok(sha.trim().to_owned())
}

async fn git(dir: &Path, args: &[&str], token: Option<&str>) -> Result<()> {
    git_output(dir, args, token, &[]).await.map(|_| ())
}

/// Runs git in `dir` with an empty environment but `PATH`, `env` and, with a `token`, the
/// HTTP header that carries it; answers its standard output. A failure's message holds the
/// end of git's standard error, with the token scrubbed.
pub(crate) async fn git_output(
    dir: &Path,
    args: &[&str],
    token: Option<&str>,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = token {
        let basic = base64(format!("x-access-token:{token}").as_bytes());
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    let what = args.first().copied().unwrap_or("git");
    let out = match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(Error::unavailable(format!(
                "cannot run git {what} (is git installed on the worker?): {e}"
            )));
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("git {what} took longer than {} s", GIT_TIMEOUT.as_secs()),
            ));
        }
    };
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        stderr = stderr.replace(token, "[redacted]");
    }
    let tail: String = stderr
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" / ");
    Err(Error::unavailable(format!(
        "git {what} failed ({}): {tail}",
        out.status
    )))
}

/// Standard base64 with padding (the one header that needs it).
pub(crate) fn base64(bytes: &[u8]) -> String {
    crate::workspace::base64_encode(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    fn run(dir: &Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[tokio::test]
    async fn a_repository_is_checked_out_then_refreshed_to_its_ref() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        run(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("README.md"), "one").unwrap();
        run(&src, &["add", "."]);
        run(&src, &["commit", "-q", "-m", "one"]);
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        let mut repo = RepoCheckout::new(format!("file://{}", src.display()), "demo");
        repo.git_ref = Some("main".into());
        checkout(&ws, &repo).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.join("demo/README.md")).unwrap(),
            "one"
        );
        // Local edits to tracked files are dropped; a new commit arrives.
        std::fs::write(ws.join("demo/README.md"), "local edit").unwrap();
        std::fs::write(src.join("README.md"), "two").unwrap();
        run(&src, &["commit", "-q", "-am", "two"]);
        checkout(&ws, &repo).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.join("demo/README.md")).unwrap(),
            "two"
        );
        // A ref that does not exist fails with git's words, and a token never shows.
        repo.git_ref = Some("nope".into());
        repo.token = Some("tok-123".into());
        let e = checkout(&ws, &repo).await.unwrap_err();
        assert!(e.message().contains("git fetch failed"), "{e}");
        assert!(!e.message().contains("tok-123"));
        assert!(!format!("{repo:?}").contains("tok-123"));
    }
}
