//! The AnyWork reference server: the REST + WebSocket API and the web UI over an
//! [`anywork_runtime::Dispatcher`], and the `anywork-server` binary (feature `cli`).
//!
//! - [`api`]: [`router`] (everything), or its pieces [`api_router`] (REST + `/metrics`),
//!   [`ws_router`] (`/ws`) and [`ui_router`] (the web UI), over an [`AppState`]; [`serve`].
//! - The binary (`src/bin/anywork-server`): flags and environment → store, driver,
//!   dispatcher and API state; every store and driver is compiled in.
//!
//! The engine itself is `anywork-runtime`, re-exported here as [`runtime`].

pub mod api;

pub use anywork_runtime as runtime;
pub use api::{ApiOptions, ApiToken, AppState, api_router, router, serve, ui_router, ws_router};
