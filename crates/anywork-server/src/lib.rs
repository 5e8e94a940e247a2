//! The reference AnyWork server: the dispatcher, the REST and WebSocket API and the web UI,
//! wired over the library crates. It arrives with its own issue; until then this crate is
//! empty on purpose (nothing here pretends to work).
