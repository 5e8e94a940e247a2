//! Channel implementations for AnyWork: where tasks come from and where answers go.
//!
//! Each channel implements [`anywork_core::Channel`] behind a feature: `webhook` (generic
//! JSON webhook), `github`, `slack`. The web chat is served by `anywork-server` itself.
//! The implementations arrive with their own issues; until then this crate only re-exports
//! the trait so that embedders can already depend on the final path.

pub use anywork_core::channel::{Channel, ChannelDefaults, Inbound, InboundRequest};
