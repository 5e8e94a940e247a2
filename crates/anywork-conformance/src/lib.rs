//! Conformance suites for AnyWork's traits. A store or driver that passes its suite behaves
//! like the shipped ones, down to error kinds and orderings; the shipped memory, SQLite,
//! PostgreSQL stores and static, Docker, Kubernetes drivers all run them in CI.
//!
//! - [`store_conformance`]: every [`TaskStore`](anywork_core::TaskStore) — one test per
//!   case with [`store_conformance_tests!`], plus a model-based property test against a
//!   deliberately naive reference model.
//! - [`driver_conformance`]: every [`ContainerDriver`](anywork_core::ContainerDriver) —
//!   create and reuse, one worker under concurrent calls, adoption by a second instance,
//!   release, purge, the idle reaper.
//!
//! ```rust,ignore
//! // tests/conformance.rs of your store crate (dev-dependencies: anywork-conformance, tokio)
//! async fn fresh() -> std::sync::Arc<dyn anywork_core::TaskStore> { /* a new, empty store */ }
//! anywork_conformance::store_conformance_tests!(fresh);
//! // or, when the store needs something alive beside it (a directory, a schema), return
//! // `store_conformance::Fresh::new(store).keeping(dir)`: the cases call the store itself,
//! // never a wrapper that could miss one of the trait's methods.
//! ```

pub mod driver_conformance;
pub mod store_conformance;
