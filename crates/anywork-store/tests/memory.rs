//! The conformance suite on [`MemoryStore`].

use std::sync::Arc;

use anywork_core::TaskStore;
use anywork_store::MemoryStore;

async fn fresh() -> Arc<dyn TaskStore> {
    Arc::new(MemoryStore::new())
}

anywork_test::store_conformance_tests!(fresh);
