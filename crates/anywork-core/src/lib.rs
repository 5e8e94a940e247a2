//! The contract of AnyWork: domain types, the wire format and the four traits every
//! implementation plugs into.
//!
//! This crate does no I/O and depends on nothing heavy, so that an embedder can implement a
//! [`Channel`], [`ContainerDriver`], [`TaskStore`] or [`Executor`] without pulling in a
//! database driver, an HTTP stack or a container client.
//!
//! - [`session`], [`task`], [`log`]: what is stored ([`Session`], [`Task`], [`TaskLog`]).
//! - [`delivery`]: the outbox ([`Delivery`]) that takes outcomes back to their channel.
//! - [`status`]: [`TaskStatus`] and the one function that says which transitions are legal.
//! - [`event`]: [`TaskEvent`], the event stream shared by worker SSE, task logs and WebSocket.
//! - [`outcome`]: how a run ended ([`TaskOutcome`]) and the tokens it used ([`TokenUsage`]).
//! - [`ws`]: the WebSocket client/server messages, spelled as the original AnyWork spells them.
//! - [`spec`]: what a task asks the worker to set up ([`SkillSpec`], [`McpServerConfig`]), and
//!   the request forms clients send for them ([`SkillRef`], `deserialize_*_any`).
//! - [`worker_api`]: the worker's HTTP API, shared by the worker and the server.
//! - [`mcp_catalog`]: the operator's MCP servers ([`McpCatalog`]) and which a request may name
//!   ([`McpAccess`]).
//! - [`outbound`]: which addresses a request-chosen URL may reach (no SSRF).
//! - [`rest`]: [`WireTask`], the task as REST clients and push receivers see it.
//! - [`error`]: the one [`Error`] type, with a matchable [`ErrorKind`].

pub mod channel;
pub mod delivery;
pub mod driver;
pub mod error;
pub mod event;
pub mod executor;
pub mod ids;
pub mod log;
pub mod mcp_catalog;
pub mod outbound;
pub mod outcome;
pub mod rest;
pub mod session;
pub mod spec;
pub mod status;
pub mod store;
pub mod task;
pub mod worker_api;
pub mod ws;

pub use channel::{Channel, ChannelDefaults, Inbound, InboundRequest};
pub use delivery::{
    DeletedLogs, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, DeliveryTarget,
    NewDelivery, StoreSize,
};
pub use driver::{ContainerDriver, ReapGuard, SetupCheck, Unguarded, WorkerEndpoint, WorkerInfo};
pub use error::{Error, ErrorKind, Result};
pub use event::{
    AgentInit, InputKind, InputRequest, InputResponse, McpServerStatus, Progress, TaskEvent,
    WireEvent,
};
pub use executor::{
    EventStream, Execution, ExecutionControl, ExecutionRequest, Executor, OpenPullRequest,
    PullRequestOpener,
};
pub use ids::{SessionId, TaskId, Timestamp};
pub use log::{NewTaskLog, TaskLog};
pub use mcp_catalog::{CatalogServer, McpAccess, McpCatalog, SecretReader, SecretValue};
pub use outbound::OutboundPolicy;
pub use outcome::{PullRequestLink, TaskOutcome, TokenUsage};
pub use rest::WireTask;
pub use session::{NewSession, Page, Session, SessionSummary, UsageTotals};
pub use spec::{McpServerConfig, SkillRef, SkillSpec};
pub use status::TaskStatus;
pub use store::{ChangeFeed, Claim, FeedItem, LogChange, TaskStore};
pub use task::{Lease, NewTask, PushNotification, SessionMode, Task, TaskChange, TaskRequest};
