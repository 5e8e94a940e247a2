//! A custom channel inside your own axum app.
//!
//! `FormChannel` takes `POST /api/channel/form/webhook` with `{"thread": "...", "text": "..."}`
//! and an `x-form-token` header, runs the text as a task in the thread's session (the same
//! thread continues the same conversation), and delivers each answer where the app can show
//! it: `GET /answers/{thread}`. The app's own routes and AnyWork's API share one server.
//!
//! ```sh
//! anywork-worker &    # the model variables set
//! FORM_TOKEN=s3cret STATIC_WORKER_URL=http://127.0.0.1:8080 cargo run -p example-custom-channel
//! curl -H 'x-form-token: s3cret' -d '{"thread":"t1","text":"hello"}' \
//!      localhost:3002/api/channel/form/webhook
//! curl localhost:3002/answers/t1
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anywork_core::{
    Channel, Error, ErrorKind, Inbound, InboundRequest, Result, Task, TaskOutcome, TaskRequest,
};
use anywork_drivers::StaticDriver;
use anywork_runtime::Dispatcher;
use anywork_server::{ApiOptions, AppState};
use anywork_store::SqliteStore;
use axum::Json;
use axum::extract::{Path, State};
use axum::routing::get;

/// Answers by thread, as the app would keep them (a database, a message to the user, …).
type Answers = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The channel: webhook in, answers out.
struct FormChannel {
    token: String,
    answers: Answers,
}

#[derive(serde::Deserialize)]
struct FormPost {
    thread: String,
    text: String,
}

#[async_trait::async_trait]
impl Channel for FormChannel {
    fn channel_type(&self) -> &str {
        "form"
    }

    async fn parse(&self, request: InboundRequest) -> Result<Inbound> {
        if request.header("x-form-token") != Some(self.token.as_str()) {
            return Err(Error::new(
                ErrorKind::Unauthorized,
                "bad or missing x-form-token",
            ));
        }
        let post: FormPost = serde_json::from_slice(&request.body)
            .map_err(|e| Error::invalid_input(format!("expected {{thread, text}}: {e}")))?;
        if post.text.trim().is_empty() {
            return Ok(Inbound::Skip {
                reason: "empty text".into(),
            });
        }
        let mut task = TaskRequest::new("form", post.text);
        // One session per thread: the channel key finds it again.
        task.channel_key = Some(post.thread.clone());
        task.channel_meta = serde_json::json!({ "thread": post.thread });
        Ok(Inbound::Task(Box::new(task)))
    }

    async fn deliver(&self, task: &Task, outcome: &TaskOutcome) -> Result<()> {
        let thread = task.channel_meta["thread"]
            .as_str()
            .ok_or_else(|| Error::internal("task without a thread"))?
            .to_owned();
        let answer = match (&outcome.result, &outcome.error) {
            (Some(result), _) => result.clone(),
            (None, Some(error)) => format!("(failed: {error})"),
            (None, None) => format!("({})", outcome.status),
        };
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(thread)
            .or_default()
            .push(answer);
        Ok(())
    }
}

async fn show_answers(
    State(answers): State<Answers>,
    Path(thread): Path<String>,
) -> Json<Vec<String>> {
    let answers = answers.lock().unwrap_or_else(|e| e.into_inner());
    Json(answers.get(&thread).cloned().unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let token = std::env::var("FORM_TOKEN").map_err(|_| anyhow::anyhow!("set FORM_TOKEN"))?;
    let url = std::env::var("STATIC_WORKER_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let answers = Answers::default();

    let store = Arc::new(SqliteStore::open_in_dir("./data").await?);
    let dispatcher = Dispatcher::builder(store, Arc::new(StaticDriver::new(&url)?))
        .channel(Arc::new(FormChannel {
            token,
            answers: answers.clone(),
        }))
        .start()
        .await?;

    // The app's own routes, then AnyWork's API and UI beside them.
    let app = axum::Router::new()
        .route("/answers/{thread}", get(show_answers))
        .with_state(answers)
        .merge(anywork_server::router(AppState::new(
            dispatcher,
            ApiOptions::default(),
        )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3002").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> FormChannel {
        FormChannel {
            token: "t".into(),
            answers: Answers::default(),
        }
    }

    fn post(token: Option<&str>, body: &str) -> InboundRequest {
        let request = InboundRequest::new(Vec::new(), body);
        match token {
            Some(t) => request.with_header("x-form-token", t),
            None => request,
        }
    }

    #[tokio::test]
    async fn a_post_becomes_a_task_in_the_thread_session() {
        let c = channel();
        let Inbound::Task(task) = c
            .parse(post(Some("t"), r#"{"thread":"t1","text":"hi"}"#))
            .await
            .unwrap()
        else {
            panic!("expected a task");
        };
        assert_eq!(task.channel_key.as_deref(), Some("t1"));
        assert_eq!(task.message, "hi");
    }

    #[tokio::test]
    async fn bad_posts_are_refused_or_skipped() {
        let c = channel();
        let e = c.parse(post(None, "{}")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        let e = c.parse(post(Some("t"), "not json")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(matches!(
            c.parse(post(Some("t"), r#"{"thread":"t1","text":"  "}"#))
                .await
                .unwrap(),
            Inbound::Skip { .. }
        ));
    }
}
