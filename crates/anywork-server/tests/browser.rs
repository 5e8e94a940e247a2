//! The web UI in a real browser (Debian's chromium + chromedriver, driven by fantoccini): open
//! it, send a message, see the streamed answer rendered as markdown and the session's title,
//! and edit SOUL.md. Skipped with a banner without chromedriver, failed when CI is set.

mod common;

use std::process::Stdio;
use std::time::Duration;

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
    let server = TestServer::start_full(
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
