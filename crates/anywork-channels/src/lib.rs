//! Channel implementations for AnyWork: where tasks come from and where answers go.
//!
//! Each channel implements [`anywork_core::Channel`] behind a cargo feature (all on by
//! default):
//!
//! - `webhook`: [`webhook::WebhookChannel`], the original AnyWork's generic JSON webhook.
//! - `github`: [`github::GithubChannel`], issues and pull requests through the REST API.
//! - `slack`: [`slack::SlackChannel`], the Events API and the Web API.
//!
//! Each has a configuration read with `from_lookup(|name| …)` (the environment in the
//! server) and a constructor. What the caller does with what a channel returns (answers to
//! questions, follow-ups, idempotency keys, the hooks) is the [`Channel`] trait's contract.
//! The web chat is served by `anywork-server` itself. Configuration, app manifests and curl
//! examples: `docs/channels.md`.

pub use anywork_core::channel::{Channel, ChannelDefaults, Inbound, InboundRequest};

pub mod config;
pub mod verify;

#[cfg(feature = "api")]
mod api;
#[cfg(feature = "api")]
pub mod posts;
#[cfg(feature = "api")]
pub mod text;
#[cfg(feature = "api")]
mod time;

#[cfg(feature = "github")]
pub mod github;
#[cfg(feature = "slack")]
pub mod slack;
#[cfg(feature = "webhook")]
pub mod webhook;
