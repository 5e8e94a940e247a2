//! Session titles behind one small trait, [`TitleGenerator`], so an embedder can bring its
//! own. Two come with the runtime: [`FirstWords`] (the default: the first words of the first
//! message) and [`ModelTitles`] (an OpenAI-compatible model, falling back to the first words).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

/// The longest title kept, in characters.
pub const MAX_TITLE_CHARS: usize = 60;

/// Makes a short title for a new session from its first message.
#[async_trait]
pub trait TitleGenerator: Send + Sync + 'static {
    /// A title for a session whose first message is `message`: one line, never empty (the
    /// dispatcher falls back to [`first_words`] if it is).
    async fn title(&self, message: &str) -> String;

    /// The title at once, when this generator makes it without I/O: a new session is then
    /// stored with it (no second write to set it later). `None`, the default, stores the session
    /// with the default title and sets [`title`](Self::title)'s answer when it comes.
    fn title_now(&self, message: &str) -> Option<String> {
        let _ = message;
        None
    }
}

#[async_trait]
impl<T: TitleGenerator + ?Sized> TitleGenerator for std::sync::Arc<T> {
    async fn title(&self, message: &str) -> String {
        (**self).title(message).await
    }

    fn title_now(&self, message: &str) -> Option<String> {
        (**self).title_now(message)
    }
}

/// Titles from the first words of the message ([`first_words`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstWords;

#[async_trait]
impl TitleGenerator for FirstWords {
    async fn title(&self, message: &str) -> String {
        first_words(message)
    }

    fn title_now(&self, message: &str) -> Option<String> {
        Some(first_words(message)).filter(|t| !t.trim().is_empty())
    }
}

/// Titles from a model behind an OpenAI-compatible chat completions API, falling back to the
/// first words on any failure.
#[derive(Debug, Clone)]
pub struct ModelTitles {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    model: String,
}

impl ModelTitles {
    /// Asks `model` at `base_url` (`…/v1`, without `/chat/completions`) with `api_key`.
    pub fn new(base_url: &str, api_key: &str, model: &str) -> anywork_core::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| anywork_core::Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            model: model.to_owned(),
        })
    }
}

#[async_trait]
impl TitleGenerator for ModelTitles {
    async fn title(&self, message: &str) -> String {
        match ask_model(
            &self.http,
            &self.base_url,
            &self.api_key,
            &self.model,
            message,
        )
        .await
        {
            Ok(t) => {
                let t = clean(&t);
                if !t.is_empty() {
                    return t;
                }
            }
            Err(e) => tracing::warn!(error = %e, "title model failed; using the first words"),
        }
        first_words(message)
    }
}

async fn ask_model(
    http: &reqwest::Client,
    base_url: &str,
    api_key: &str,
    model: &str,
    message: &str,
) -> Result<String, String> {
    let excerpt: String = message.chars().take(2000).collect();
    let body = json!({
        "model": model,
        "stream": false,
        "max_tokens": 30,
        "messages": [
            {"role": "system", "content": "Write a title of at most six words for a chat that starts with the user's message. Answer with the title only, no quotes."},
            {"role": "user", "content": excerpt},
        ],
    });
    let response = http
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth(api_key)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the title model answered {status}"));
    }
    let text = response.text().await.map_err(|e| e.to_string())?;
    // Accept a plain JSON completion, or an SSE stream of chunks from a server that streams
    // regardless.
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| "the title model's answer has no choices[0].message.content".into());
    }
    let mut out = String::new();
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data:")
            && let Ok(v) = serde_json::from_str::<Value>(data.trim())
            && let Some(piece) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        {
            out.push_str(piece);
        }
    }
    if out.is_empty() {
        Err("the title model's answer is neither JSON nor a stream with content".into())
    } else {
        Ok(out)
    }
}

/// One line, no surrounding quotes or trailing period, at most [`MAX_TITLE_CHARS`].
fn clean(raw: &str) -> String {
    let line = raw.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let t = line
        .trim()
        .trim_start_matches(['"', '\'', '“', '#', '*'])
        .trim_end_matches(['"', '\'', '”', '.', '*'])
        .trim();
    let t = t.strip_prefix("Title:").map(str::trim).unwrap_or(t);
    truncate(t)
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_TITLE_CHARS {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(MAX_TITLE_CHARS - 1).collect();
    if let Some(space) = out.rfind(' ')
        && space > MAX_TITLE_CHARS / 2
    {
        out.truncate(space);
    }
    out.push('…');
    out
}

/// The first six words of `message` on one line (or "New Chat" for an empty one).
pub fn first_words(message: &str) -> String {
    let words: Vec<&str> = message.split_whitespace().take(6).collect();
    if words.is_empty() {
        return anywork_core::NewSession::DEFAULT_TITLE.to_owned();
    }
    let mut title = words.join(" ");
    if message.split_whitespace().nth(6).is_some() {
        title.push('…');
    }
    truncate(&title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_words_are_short_and_one_line() {
        assert_eq!(first_words("hello"), "hello");
        assert_eq!(
            first_words("Please write\na poem about the sea and the sky"),
            "Please write a poem about the…"
        );
        assert_eq!(first_words("   "), "New Chat");
        let long = "x".repeat(500);
        assert!(first_words(&long).chars().count() <= MAX_TITLE_CHARS);
    }

    #[test]
    fn model_titles_are_cleaned() {
        assert_eq!(clean("\"Sea Poem Request.\"\n"), "Sea Poem Request");
        assert_eq!(clean("Title: Rust help"), "Rust help");
        assert_eq!(clean("\n\n  # Plan  \nmore"), "Plan");
    }
}
