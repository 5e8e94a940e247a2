//! AnyWork's engine, with no HTTP server: schedule tasks per session, run them on workers
//! from a [`ContainerDriver`](anywork_core::ContainerDriver), store and fan out every event,
//! deliver outcomes to channels. Stores, drivers, channels and executors come in as the
//! `anywork-core` traits; this crate depends on no other AnyWork crate.
//!
//! ```rust,ignore
//! let dispatcher = Dispatcher::builder(store, driver).channel(my_channel).start().await?;
//! let (submitted, events) = dispatcher.submit_and_follow(TaskRequest::new("cli", "Hi")).await?;
//! // `events`: every event of the task, in order, up to its `done`.
//! ```
//!
//! - [`Dispatcher`]: submit, cancel, answer input; sessions, logs and live
//!   [`events`](Dispatcher::events); inbound channel requests; workspace documents; metrics.
//! - [`LiveEvent`]: a stored event of a task, with its seq.
//! - [`title`]: [`TitleGenerator`] and the two that ship ([`FirstWords`], [`ModelTitles`]).
//! - [`skills`]: skills asked for by name ([`SkillSource`], [`SkillsDir`]: `SKILLS_DIR`).
//! - [`metrics`]: what [`Dispatcher::register_metrics`] registers (`prometheus-client`).
//! - [`worker_client`]: [`WorkerClient`], the client side of the worker HTTP API.

mod dispatcher;
mod follow;
mod hub;
pub mod metrics;
mod notices;
mod outbound;
mod shrink;
pub mod skills;
mod task_map;
pub mod title;
pub mod worker_client;

pub use dispatcher::outbox::headers as push_headers;
pub use dispatcher::outbox::sign as sign_push;
pub use dispatcher::{
    Backoff, Dispatcher, DispatcherBuilder, DispatcherConfig, DocFile, InboundOutcome,
    OutboxConfig, Retention, RetentionRound, Submitted, WorkspaceDoc,
};
pub use hub::LiveEvent;
pub use notices::Notices;
pub use skills::{NoSkills, SkillCatalog, SkillInfo, SkillSource, SkillsDir};
pub use title::{FirstWords, ModelTitles, TitleGenerator};
pub use worker_client::WorkerClient;

/// The registry type [`Dispatcher::register_metrics`] takes (re-exported so an embedder needs
/// no version match of its own).
pub use prometheus_client;
