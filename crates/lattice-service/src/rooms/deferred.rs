//! Events acknowledged together, made durable together.
//!
//! A federation transaction is answered once, after all its PDUs are ingested, and until then
//! the sending server keeps it and sends it again. So its events need not be fsynced one by one:
//! inside [`with_deferred_durability`] each event's batch is applied, and visible, at once
//! ([`KvStore::write_deferred`](lattice_storage::KvStore::write_deferred)), and the caller's
//! durable write at the end, which follows them in the store's one ordered log, makes all of
//! them durable with one sync. A power cut before that write takes only what was never
//! acknowledged; stream positions are never handed out twice, so a client that saw such an event
//! meets it again, at a new position, when the sending server retries.

use std::future::Future;

tokio::task_local! {
    static DEFERRED: ();
}

/// Runs `work` with the events it ingests written deferred. The caller ends it with a durable
/// write (or [`KvStore::flush`](lattice_storage::KvStore::flush)) before it acknowledges anything
/// `work` stored. Tasks `work` spawns write as usual.
pub(crate) async fn with_deferred_durability<F: Future>(work: F) -> F::Output {
    DEFERRED.scope((), work).await
}

/// Whether the current task ingests inside [`with_deferred_durability`].
pub(super) fn deferred() -> bool {
    DEFERRED.try_with(|_| ()).is_ok()
}
