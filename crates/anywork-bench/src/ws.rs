//! The benchmarks' WebSocket client of the server's `/ws`: one chat at a time per connection.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use anywork_core::TaskId;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::standin::{STAMP, mono_ns};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any one WebSocket message may take before the benchmark gives up.
const WAIT: Duration = Duration::from_secs(300);

pub async fn connect(http_url: &str) -> anyhow::Result<Ws> {
    let url = format!("{}/ws", http_url.replacen("http://", "ws://", 1));
    // Nagle off, as the server has it: small frames must not wait for delayed ACKs. Small
    // buffers: the default read buffer (128 KiB) is zeroed on every read, which costs the
    // load generator CPU that the server under test then lacks, and 10,000 of them are 1.3 GB.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .context("connect /ws")?;
    Ok(ws)
}

pub async fn send(ws: &mut Ws, v: &Value) -> anyhow::Result<()> {
    ws.send(Message::Text(v.to_string().into())).await?;
    Ok(())
}

/// The next JSON text message.
pub async fn recv(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no WebSocket message in time")?
            .context("the server closed the WebSocket")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

/// Opens a connection and has one ping answered (so it is fully set up).
pub async fn idle_connection(url: String) -> anyhow::Result<Ws> {
    let mut ws = connect(&url).await?;
    send(&mut ws, &json!({"type": "ping"})).await?;
    loop {
        if recv(&mut ws).await?["type"] == "pong" {
            return Ok(ws);
        }
    }
}

/// What the client saw of one chat.
pub struct ChatTimes {
    pub sent: Instant,
    /// CLOCK_MONOTONIC ns when the chat was sent (see [`mono_ns`]).
    pub sent_ns: u64,
    /// CLOCK_MONOTONIC ns when the stand-in worker got the task's `/chat`, from the stamp
    /// in its `text` event (`None` for another worker).
    pub worker_ns: Option<u64>,
    pub done: Instant,
}

impl ChatTimes {
    /// Chat sent → the stand-in worker got `/chat`.
    pub fn dispatch(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.worker_ns?.saturating_sub(self.sent_ns),
        ))
    }
}

/// Sends one chat and reads up to its `done`; returns the times and the session.
pub async fn chat(
    ws: &mut Ws,
    session: Option<&str>,
    message: &str,
) -> anyhow::Result<(ChatTimes, String)> {
    let mut request = json!({"type": "chat", "message": message});
    if let Some(s) = session {
        request["session_id"] = json!(s);
    }
    let request = Message::Text(request.to_string().into());
    let sent = Instant::now();
    let sent_ns = mono_ns();
    ws.send(request).await?;
    let mut session = session.map(str::to_owned);
    let mut task: Option<TaskId> = None;
    let mut worker_ns = None;
    loop {
        let v = recv(ws).await?;
        match v["type"].as_str().unwrap_or_default() {
            "session_created" => session = v["session_id"].as_str().map(str::to_owned),
            "task_created" => {
                let id: TaskId = serde_json::from_value(v["task_id"].clone())?;
                task = Some(id);
            }
            "text" => {
                if let Some(ns) = v["content"]
                    .as_str()
                    .and_then(|c| c.strip_prefix(STAMP))
                    .and_then(|n| n.parse().ok())
                {
                    worker_ns = Some(ns);
                }
            }
            "done" if task.is_some_and(|id| v["task_id"] == json!(id)) => {
                let done = Instant::now();
                let status = v["metadata"]["status"].as_str().unwrap_or_default();
                ensure!(status == "completed", "a task ended {status}: {v}");
                task.context("done before task_created")?;
                let session = session.context("no session_created")?;
                return Ok((
                    ChatTimes {
                        sent,
                        sent_ns,
                        worker_ns,
                        done,
                    },
                    session,
                ));
            }
            "error" if v["task_id"].is_null() || task.is_none() => bail!("server error: {v}"),
            _ => {}
        }
    }
}
