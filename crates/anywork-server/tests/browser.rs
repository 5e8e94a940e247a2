//! The web UI in a real browser (Debian's chromium + chromedriver, driven by fantoccini): open
//! it, send a message, see the streamed answer rendered as markdown and the session's title,
//! and edit SOUL.md. Skipped with a banner without chromedriver, failed when CI is set.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anywork_runtime::Backoff;
use anywork_test::fake_llm::{FakeLlm, Reply};
use common::{TestServer, WorkerProcess, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

fn chromedriver() -> Option<String> {
    let found = std::env::var("CHROMEDRIVER").ok().or_else(|| {
        ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(|p| (*p).to_owned())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromedriver not found (apt-get install chromium chromium-driver); required when CI is set"
        );
        eprintln!(
            "!! SKIPPED the browser test: chromedriver not found (apt-get install chromium chromium-driver)"
        );
    }
    found
}

async fn browser(port: u16) -> Client {
    // fantoccini's rustls connector needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut caps = serde_json::Map::new();
    let mut options = json!({"args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ]});
    if let Ok(bin) = std::env::var("CHROMIUM_BIN") {
        options["binary"] = json!(bin);
    }
    caps.insert("goog:chromeOptions".into(), options);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot start chromium: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until `css` matches an element whose text contains `needle`.
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for el in c.find_all(Locator::Css(css)).await.unwrap_or_default() {
            if let Ok(t) = el.text().await
                && t.contains(needle)
            {
                return t;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {css} containing {needle:?}; page: {}",
            c.source()
                .await
                .unwrap_or_default()
                .chars()
                .take(4000)
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_the_browser_and_edit_soul() {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|req| {
        if req.contains_text("script please") {
            Reply::text("Careful: <img src=x onerror=\"document.title='pwned'\"> done")
        } else {
            Reply::text("**Hello** from the *fake* model.\n\n- one\n- two")
        }
    });
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let port = free_port();
    let _driver = tokio::process::Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let c = browser(port).await;
    let result = async {
        c.goto(&server.url).await.unwrap();
        c.wait()
            .for_element(Locator::Css("#message-input"))
            .await
            .unwrap();
        let input = c.find(Locator::Css("#message-input")).await.unwrap();
        input.send_keys("Hello browser test").await.unwrap();
        click(&c, "#send").await;

        // The streamed answer, rendered as markdown.
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(".msg.assistant[data-status=\"completed\"]"))
            .await
            .unwrap();
        let answer = text_of(&c, ".msg.assistant .content").await;
        assert!(answer.contains("Hello from the fake model."), "{answer}");
        assert!(!answer.contains("**"), "markdown is rendered: {answer}");
        let strong = text_of(&c, ".msg.assistant .content strong").await;
        assert_eq!(strong, "Hello");
        assert_eq!(
            c.find_all(Locator::Css(".msg.assistant .content li"))
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            text_of(&c, ".msg.user")
                .await
                .contains("Hello browser test")
        );

        // The session shows up with its title.
        wait_text(
            &c,
            "#session-list .session-item .session-title",
            "Hello browser test",
        )
        .await;

        // Model output is text, never markup.
        let input = c.find(Locator::Css("#message-input")).await.unwrap();
        input.send_keys("script please").await.unwrap();
        click(&c, "#send").await;
        wait_text(&c, ".msg.assistant .content", "Careful:").await;
        assert!(
            c.find_all(Locator::Css(".msg.assistant .content img"))
                .await
                .unwrap()
                .is_empty()
        );
        assert_ne!(c.title().await.unwrap(), "pwned");

        // SOUL.md in the modal editor, saved to the worker.
        click(&c, "#soul-button").await;
        c.wait()
            .for_element(Locator::Css("#doc-editor"))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let editor = c.find(Locator::Css("#doc-editor")).await.unwrap();
        while editor
            .prop("value")
            .await
            .unwrap()
            .unwrap_or_default()
            .is_empty()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "SOUL.md never loaded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        editor.clear().await.unwrap();
        editor.send_keys("You are a careful pirate.").await.unwrap();
        click(&c, "#doc-save").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, soul) = server.get("/api/workspace/soul").await;
            if soul["content"] == "You are a careful pirate." {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "SOUL.md not saved: {soul}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let heading = text_of(&c, "#doc-heading").await;
        assert!(heading.contains("defaults for new sessions"), "{heading}");

        // The open session's own SOUL.md, clearly labelled, saved into that session only.
        let label = text_of(&c, "#doc-scope-session-label").await;
        assert!(label.contains("This session"), "{label}");
        click(&c, "#doc-scope-session").await;
        wait_text(&c, "#doc-heading", "this session").await;
        wait_text(&c, "#doc-scope-hint", "This session only").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let editor = c.find(Locator::Css("#doc-editor")).await.unwrap();
        loop {
            let value = editor.prop("value").await.unwrap().unwrap_or_default();
            let disabled = editor.prop("disabled").await.unwrap().unwrap_or_default();
            if value.contains("# Soul") && disabled == "false" {
                break; // the session started before the default changed
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the session's SOUL.md never loaded: {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        editor.clear().await.unwrap();
        editor
            .send_keys("Only this chat is a parrot.")
            .await
            .unwrap();
        click(&c, "#doc-save").await;
        wait_text(&c, "#doc-status", "Saved").await;
        let (_, sessions) = server.get("/api/sessions").await;
        let mut found = false;
        for s in sessions["sessions"].as_array().unwrap() {
            let id = s["id"].as_str().unwrap();
            let (_, soul) = server
                .get(&format!("/api/sessions/{id}/workspace/soul"))
                .await;
            found |= soul["content"] == "Only this chat is a parrot.";
        }
        assert!(found, "one session has its own SOUL.md");
        let (_, defaults) = server.get("/api/workspace/soul").await;
        assert_eq!(
            defaults["content"], "You are a careful pirate.",
            "the defaults are untouched"
        );
    }
    .await;
    let _ = c.close().await;
    result
}

/// Starts chromedriver and a browser on `port`.
async fn start_browser(driver_bin: &str) -> (tokio::process::Child, Client) {
    let port = free_port();
    let driver = tokio::process::Command::new(driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    (driver, browser(port).await)
}

/// Nobody listens at the static worker URL: the banner says so from the start-up check, and
/// while a task waits, each failed attempt to get its worker shows up in place of the dots
/// (why, attempt n of m, next try); the admin page shows the mute worker, the waiting task
/// and its timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_problems_and_worker_progress_are_shown() {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let server = TestServer::without_worker(Backoff::new(
        30,
        Duration::from_secs(2),
        Duration::from_secs(2),
    ))
    .await;
    let (_driver, c) = start_browser(&driver_bin).await;
    let result = async {
        c.goto(&server.url).await.unwrap();
        let banner = wait_text(
            &c,
            "#banner .setup-problem[data-check=\"worker\"]",
            "STATIC_WORKER_URL",
        )
        .await;
        assert!(banner.contains("static"), "the driver is named: {banner}");

        let input = c.find(Locator::Css("#message-input")).await.unwrap();
        input.send_keys("Hello while nobody works").await.unwrap();
        click(&c, "#send").await;
        let progress = wait_text(&c, ".msg.assistant .working-label.progress", "of 30").await;
        assert!(
            progress.contains("STATIC_WORKER_URL"),
            "the reason: {progress}"
        );
        assert!(progress.contains("Trying again in 2.0 s"), "{progress}");
        let stage = c
            .find(Locator::Css(".msg.assistant .working"))
            .await
            .unwrap()
            .attr("data-stage")
            .await
            .unwrap();
        assert_eq!(stage.as_deref(), Some("worker"));

        // The admin page: the worker is not answering, the task waits, its timeline shows
        // the progress events.
        click(&c, "#admin-link").await;
        wait_text(&c, "#admin-workers td", "not answering").await;
        wait_text(&c, "#admin-tasks td", "pending").await;
        wait_text(&c, "#admin-load", "driver static").await;
        click(&c, "#admin-tasks .admin-task").await;
        wait_text(&c, "#admin-timeline .timeline-type", "progress").await;
        wait_text(&c, "#admin-timeline .timeline-text", "attempt").await;
        click(&c, "#admin-close").await;

        // Canceled while it waits: the progress line goes with the wait.
        click(&c, "#cancel").await;
        c.wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(".msg.assistant[data-status=\"canceled\"]"))
            .await
            .unwrap();
        assert!(
            c.find_all(Locator::Css(".working-label.progress"))
                .await
                .unwrap()
                .is_empty(),
            "the progress line goes with the wait"
        );
    }
    .await;
    let _ = c.close().await;
    result
}

/// Per-session URLs (#/s/<id>; a reload keeps the conversation), search by title (on the
/// server: a session beyond the first loaded page is found), the conversation exported as
/// Markdown, its tokens in the header, the total of all sessions in the sidebar, and the
/// workspace file panel (a file uploaded into files/ is listed, opened as text, and offered
/// for download).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_links_search_export_usage_and_files() {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|req| {
        if req.contains_text("Apples") {
            Reply::text("Apples are red.")
        } else {
            Reply::text("Bananas are yellow.")
        }
    });
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    // One old session, then more than a page of the sidebar (50) of newer ones: the old one
    // is not loaded until searched for.
    let (status, _) = server
        .post("/api/sessions", json!({"title": "Needle in the haystack"}))
        .await;
    assert_eq!(status, 201);
    for i in 0..55 {
        let (status, _) = server
            .post("/api/sessions", json!({"title": format!("Filler {i}")}))
            .await;
        assert_eq!(status, 201);
    }
    let (_driver, c) = start_browser(&driver_bin).await;
    let result = async {
        c.goto(&server.url).await.unwrap();
        for msg in ["Apples please", "Bananas please"] {
            click(&c, "#new-chat").await;
            let input = c.find(Locator::Css("#message-input")).await.unwrap();
            input.send_keys(msg).await.unwrap();
            click(&c, "#send").await;
            wait_text(
                &c,
                ".msg.assistant[data-status=\"completed\"] .content",
                "are",
            )
            .await;
        }
        // The open conversation is in the URL; a reload shows it again.
        let url = c.current_url().await.unwrap().to_string();
        let id = url.split("#/s/").nth(1).expect("a #/s/<id> URL").to_owned();
        let (status, _) = server.get(&format!("/api/sessions/{id}")).await;
        assert_eq!(status, 200, "the URL names a real session: {url}");
        c.refresh().await.unwrap();
        wait_text(&c, ".msg.assistant .content", "Bananas are yellow.").await;
        assert!(
            c.current_url()
                .await
                .unwrap()
                .as_str()
                .ends_with(&format!("#/s/{id}"))
        );
        let usage = wait_text(&c, "#session-usage", "tokens").await;
        assert!(usage.contains('$'), "{usage}");
        // The total of all sessions, as the server sums it.
        let (_, totals) = server.get("/api/usage").await;
        assert_eq!(totals["tasks"], 2, "{totals}");
        let cost = format!("${:.4}", totals["costUsd"].as_f64().unwrap());
        let tokens = totals["usage"]["input_tokens"].as_u64().unwrap()
            + totals["usage"]["output_tokens"].as_u64().unwrap();
        assert!(tokens > 0, "{totals}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Both tasks counted (the box is refreshed after each done).
            let title = c
                .find(Locator::Css("#usage-total"))
                .await
                .unwrap()
                .attr("title")
                .await
                .unwrap()
                .unwrap_or_default();
            if title.contains("58 conversations (2 tasks)") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "total: {title}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let total = text_of(&c, "#usage-total").await;
        assert!(total.starts_with("Total "), "{total}");
        assert!(total.contains(&cost), "{total} shows {cost}");
        assert!(total.contains("tokens"), "{total}");

        // A shared link opens that conversation in a fresh page.
        let (_, sessions) = server.get("/api/sessions").await;
        let apples = sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] != id.as_str())
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        c.goto(&format!("{}/#/s/{apples}", server.url))
            .await
            .unwrap();
        wait_text(&c, ".msg.assistant .content", "Apples are red.").await;

        // Search by title.
        wait_text(&c, "#session-list .session-title", "Bananas").await;
        for el in c
            .find_all(Locator::Css("#session-list .session-title"))
            .await
            .unwrap()
        {
            let title = el.text().await.unwrap();
            assert!(
                !title.contains("Needle"),
                "loaded with the first page: {title}"
            );
        }
        let search = c.find(Locator::Css("#session-search")).await.unwrap();
        search.send_keys("banan").await.unwrap();
        let titles = c
            .find_all(Locator::Css("#session-list .session-title"))
            .await
            .unwrap();
        assert_eq!(titles.len(), 1);
        assert!(titles[0].text().await.unwrap().contains("Bananas"));
        // A session beyond the loaded page: found by the server's search.
        search.clear().await.unwrap();
        search.send_keys("HAYSTACK").await.unwrap();
        wait_text(&c, "#session-list .session-title", "Needle in the haystack").await;
        assert_eq!(
            c.find_all(Locator::Css("#session-list .session-title"))
                .await
                .unwrap()
                .len(),
            1
        );
        click(&c, "#session-list .session-item").await;
        wait_text(&c, "#chat-title", "Needle in the haystack").await;
        search.clear().await.unwrap();
        search.send_keys("nothing like this").await.unwrap();
        wait_text(&c, "#session-list .side-empty", "No conversation matches").await;
        c.goto(&format!("{}/#/s/{apples}", server.url))
            .await
            .unwrap();
        wait_text(&c, ".msg.assistant .content", "Apples are red.").await;

        // Export as Markdown.
        click(&c, "#export-button").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let markdown = loop {
            let v = c
                .execute("return window.AnyWorkLastExport || null", vec![])
                .await
                .unwrap();
            if let Some(md) = v.as_str() {
                break md.to_owned();
            }
            assert!(tokio::time::Instant::now() < deadline, "no export");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(markdown.starts_with("# Apples please"), "{markdown}");
        assert!(markdown.contains("## You\n\nApples please"), "{markdown}");
        assert!(
            markdown.contains("## Agent\n\nApples are red."),
            "{markdown}"
        );

        // Files: upload through the API, list, open as text, download link.
        let r = server
            .http
            .put(format!(
                "{}/api/sessions/{apples}/files/notes/list.txt",
                server.url
            ))
            .body("one\ntwo\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        click(&c, "#files-button").await;
        wait_text(&c, "#files-list .file-name", "notes/list.txt").await;
        click(&c, "#files-list .file-name").await;
        wait_text(&c, "#files-viewer-text", "two").await;
        let href = c
            .find(Locator::Css("#files-list .file-download"))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .unwrap();
        assert!(href.ends_with("/files/notes/list.txt"), "{href}");
        let zip = c
            .find(Locator::Css("#files-zip"))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .unwrap();
        assert!(
            zip.ends_with(&format!("/api/sessions/{apples}/files.zip")),
            "{zip}"
        );
    }
    .await;
    let _ = c.close().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_asks_for_the_api_token_once_and_uses_it() {
    const TOKEN: &str = "browser-t0ken";
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Answered with a token."));
    let worker = WorkerProcess::start(&fake).await;
    let mut options = anywork_server::ApiOptions::default();
    options.api_token = anywork_server::ApiToken::new(TOKEN);
    let server = TestServer::start_with_options(
        &worker.url,
        anywork_runtime::DispatcherConfig::default(),
        anywork_runtime::FirstWords,
        options,
    )
    .await;
    let port = free_port();
    let _driver = tokio::process::Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let c = browser(port).await;
    let result = async {
        c.goto(&server.url).await.unwrap();
        // The first API call gets 401: the UI prompts for the token.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = c.get_alert_text().await {
                assert!(text.contains("ANYWORK_API_TOKEN"), "{text}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no token prompt");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.send_alert_text(TOKEN).await.unwrap();
        c.accept_alert().await.unwrap();
        let stored = c
            .execute("return localStorage.getItem('anywork.apiToken')", vec![])
            .await
            .unwrap();
        assert_eq!(stored, json!(TOKEN));
        // REST and the WebSocket (token as subprotocol) work: a chat is answered.
        c.wait()
            .for_element(Locator::Css("#message-input"))
            .await
            .unwrap();
        wait_text(&c, "#conn-status", "Connected").await;
        let input = c.find(Locator::Css("#message-input")).await.unwrap();
        input.send_keys("Hello with a token").await.unwrap();
        click(&c, "#send").await;
        wait_text(&c, ".msg.assistant .content", "Answered with a token.").await;
        // Kept: a reload asks nothing.
        c.refresh().await.unwrap();
        wait_text(
            &c,
            "#session-list .session-item .session-title",
            "Hello with a token",
        )
        .await;
        assert!(c.get_alert_text().await.is_err(), "asked again");
    }
    .await;
    let _ = c.close().await;
    result
}
