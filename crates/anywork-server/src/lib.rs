//! The AnyWork reference server: wiring over the library crates, small enough to copy.
//!
//! - [`dispatcher`]: [`Dispatcher`] schedules tasks per session, runs them on workers from a
//!   [`ContainerDriver`](anywork_core::ContainerDriver), logs and fans out every event.
//! - [`hub`] and [`follow`]: live events for WebSocket clients and log long-polls, exact across
//!   reconnects.
//! - [`api`]: the REST + WebSocket API and the embedded web UI ([`api::router`]).
//! - [`worker_client`]: the worker HTTP API, client side.
//! - [`title`], [`metrics`]: session titles and Prometheus metrics.
//! - [`config`]: environment and flags → a running server ([`config::Config::build`]).

pub mod api;
pub mod config;
pub mod dispatcher;
pub mod follow;
pub mod hub;
pub mod metrics;
pub mod title;
pub mod worker_client;

pub use api::{ApiOptions, AppState, router, serve};
pub use dispatcher::{Backoff, Dispatcher, DispatcherBuilder, DispatcherConfig, Submitted};
pub use hub::{Hub, LiveEvent};
pub use title::Titler;
pub use worker_client::WorkerClient;
