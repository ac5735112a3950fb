//! Group commit for the RocksDB backend: one committer thread takes every queued batch, checks
//! each batch's conditions in queue order, and writes all the batches that pass as one RocksDB
//! write, with one fsync when any of them must be durable.
//!
//! The write-ahead log is one ordered log and RocksDB syncs every log file before a synced
//! write returns, so a synced group also makes every earlier group durable, synced or not: that
//! is what lets [`Durability::Deferred`] batches become durable with the next synced one.
//!
//! A batch's conditions see the database *and* the batches accepted before it in the same group,
//! so the group's outcome is exactly that of writing its batches one by one in queue order. One
//! fsync then covers as many writers as arrived while the previous group was being written.
//!
//! A batch that need not be synced skips the queue when no group is being written: its caller
//! checks and writes it on its own thread, under the same lock the committer holds for a group,
//! which saves the two thread hand-offs that are most of the cost of a small write (one room's
//! inbound PDUs are written one after another, each waiting for the last).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use rocksdb::WriteOptions;
use tokio::sync::oneshot;

use crate::kv::{WriteBatch, WriteOp};
use crate::rocks::{OpenDb, cf};
use crate::{StorageError, Table};

/// At most this many batches are written together, so one group's reply is never held back
/// behind an unbounded queue.
const MAX_GROUP_BATCHES: usize = 1_024;

/// How soon a queued batch must be on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// On disk before the writer is answered when `storage.sync_writes` is on (the default).
    Configured,
    /// On disk before the writer is answered, whatever `sync_writes` says.
    Synced,
    /// Applied and visible at once, on disk with the next synced group (or at shutdown).
    Deferred,
}

impl Durability {
    fn needs_sync(self, sync_all: bool) -> bool {
        match self {
            Durability::Configured => sync_all,
            Durability::Synced => true,
            Durability::Deferred => false,
        }
    }
}

/// One queued write and where its outcome goes.
struct Queued {
    batch: WriteBatch,
    durability: Durability,
    reply: oneshot::Sender<Result<(), StorageError>>,
}

/// The writers' end of the committer thread's queue. Dropping it ends the thread once the queue
/// is empty, and waits for that, so the thread's hold on the database is gone by then.
pub(crate) struct Committer {
    queue: Option<mpsc::Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: Arc<OpenDb>,
    sync_all: bool,
    /// Held while batches' conditions are checked and the batches written: by the committer
    /// thread for a group, by a caller writing its own batch inline.
    applying: Arc<Mutex<()>>,
}

impl Committer {
    /// Starts the committer thread. `sync_all` makes every group durable (`storage.sync_writes`).
    pub(crate) fn start(db: Arc<OpenDb>, sync_all: bool) -> Result<Self, StorageError> {
        let (queue, incoming) = mpsc::channel();
        let applying = Arc::new(Mutex::new(()));
        let thread = std::thread::Builder::new()
            .name("lattice-commit".into())
            .spawn({
                let (db, applying) = (db.clone(), applying.clone());
                move || run(&db, &applying, &incoming, sync_all)
            })
            .map_err(|e| StorageError::Task(format!("starting the committer thread: {e}")))?;
        Ok(Self { queue: Some(queue), thread: Some(thread), db, sync_all, applying })
    }

    /// Writes the batch (or finds its conditions fail): inline when it need not be synced and
    /// nothing else is being written, else queued to wait for its group. A caller that stops
    /// waiting does not take a queued batch back: it is applied or refused as if the caller had
    /// waited, in queue order.
    pub(crate) async fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), StorageError> {
        if !durability.needs_sync(self.sync_all)
            && let Some(outcome) = self.write_inline(&batch)
        {
            return outcome;
        }
        let (reply, outcome) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        queue.send(Queued { batch, durability, reply }).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

impl Committer {
    /// Checks and writes `batch` on the caller's thread, unsynced, when no group is being
    /// written. `None` when one is, or when RocksDB would have stalled the write (a caller's
    /// thread must not wait for compactions): then the batch goes through the queue.
    fn write_inline(&self, batch: &WriteBatch) -> Option<Result<(), StorageError>> {
        let _applying = self.applying.try_lock().ok()?;
        match Staged::default().conditions_hold(&self.db, batch) {
            Ok(true) => {}
            Ok(false) => return Some(Err(StorageError::Conflict)),
            Err(e) => return Some(Err(e)),
        }
        let mut rocks = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            stage(&self.db, &mut rocks, op);
        }
        let mut options = WriteOptions::default();
        options.set_no_slowdown(true);
        match self.db.write_opt(rocks, &options) {
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            outcome => Some(outcome.map_err(StorageError::Rocks)),
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the batches already queued; the wait is one
        // group write at most.
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> StorageError {
    StorageError::Task("the committer thread stopped".into())
}

fn run(db: &OpenDb, applying: &Mutex<()>, incoming: &mpsc::Receiver<Queued>, sync_all: bool) {
    while let Ok(first) = incoming.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_BATCHES {
            match incoming.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        // The lock guards nothing but the order of writes, so a panic while it was held
        // leaves nothing to mend.
        let _applying = applying.lock().unwrap_or_else(PoisonError::into_inner);
        commit(db, group, sync_all);
    }
}

/// Writes the batches of `group` whose conditions hold, in one RocksDB write, and answers each.
/// Returns whether the write was synced.
fn commit(db: &OpenDb, group: Vec<Queued>, sync_all: bool) -> bool {
    let mut staged = Staged::default();
    let mut accepted = Vec::with_capacity(group.len());
    let mut sync = false;
    for queued in group {
        match staged.conditions_hold(db, &queued.batch) {
            Ok(true) => {
                sync |= queued.durability.needs_sync(sync_all);
                staged.add(db, queued.batch);
                accepted.push(queued.reply);
            }
            Ok(false) => {
                let _ = queued.reply.send(Err(StorageError::Conflict));
            }
            Err(e) => {
                let _ = queued.reply.send(Err(e));
            }
        }
    }
    let outcome = staged.write(db, sync);
    for reply in accepted {
        // A caller that stopped waiting has nobody to tell.
        let _ = reply.send(outcome.clone().map_err(StorageError::Rocks));
    }
    sync
}

/// The accepted batches of a group: one RocksDB batch, and what they wrote, so that the
/// conditions of later batches in the group see it.
#[derive(Default)]
struct Staged {
    rocks: rocksdb::WriteBatch,
    /// Table → key → the value the group's accepted batches left there (`None`: deleted).
    written: HashMap<Table, HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Staged {
    fn conditions_hold(&self, db: &OpenDb, batch: &WriteBatch) -> Result<bool, StorageError> {
        for condition in &batch.conditions {
            let staged = self.written.get(&condition.table).and_then(|keys| keys.get(condition.key.as_slice()));
            let holds = match staged {
                Some(staged) => staged.as_deref() == condition.expected.as_deref(),
                None => {
                    let current = db.get_pinned_cf(cf(db, condition.table), &condition.key)?;
                    current.as_deref() == condition.expected.as_deref()
                }
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn add(&mut self, db: &OpenDb, batch: WriteBatch) {
        for op in batch.ops {
            stage(db, &mut self.rocks, &op);
            let (table, key, value) = match op {
                WriteOp::Put { table, key, value } => (table, key, Some(value)),
                WriteOp::Delete { table, key } => (table, key, None),
            };
            self.written.entry(table).or_default().insert(key, value);
        }
    }

    fn write(self, db: &OpenDb, sync: bool) -> Result<(), rocksdb::Error> {
        if self.rocks.is_empty() {
            return Ok(());
        }
        let mut options = WriteOptions::default();
        // RocksDB syncs the WAL before it makes the group visible to readers.
        options.set_sync(sync);
        db.write_opt(self.rocks, &options)
    }
}

/// Adds one write to a RocksDB batch.
fn stage(db: &OpenDb, rocks: &mut rocksdb::WriteBatch, op: &WriteOp) {
    match op {
        WriteOp::Put { table, key, value } => rocks.put_cf(cf(db, *table), key, value),
        WriteOp::Delete { table, key } => rocks.delete_cf(cf(db, *table), key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RocksOptions, RocksStore};

    fn queued(batch: WriteBatch) -> (Queued, oneshot::Receiver<Result<(), StorageError>>) {
        queued_as(batch, Durability::Configured)
    }

    fn queued_as(batch: WriteBatch, durability: Durability) -> (Queued, oneshot::Receiver<Result<(), StorageError>>) {
        let (reply, outcome) = oneshot::channel();
        (Queued { batch, durability, reply }, outcome)
    }

    #[test]
    fn a_group_is_synced_when_one_of_its_batches_must_be_durable_and_deferred_ones_wait() {
        use Durability::{Configured, Deferred, Synced};
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        let synced = |durabilities: &[Durability], sync_all: bool| {
            let group = durabilities.iter().enumerate().map(|(n, durability)| {
                let mut batch = WriteBatch::new();
                batch.put(Table::Users, format!("k{n}").into_bytes(), b"v".to_vec());
                queued_as(batch, *durability).0
            });
            commit(&store.db, group.collect(), sync_all)
        };
        assert!(!synced(&[Deferred, Deferred], true), "deferred batches alone wait for a later sync");
        assert!(synced(&[Deferred, Configured], true), "…and are covered by a durable one in their group");
        assert!(!synced(&[Configured], false), "sync_writes off");
        assert!(synced(&[Deferred, Synced], false), "a synced write is synced whatever sync_writes says");
    }

    /// Polls a write once: the inline path finishes in its first poll, a queued write cannot
    /// while the committer thread waits for the lock.
    fn poll_once<F: std::future::Future>(write: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        write.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn a_write_that_need_not_be_synced_skips_the_queue_unless_a_group_is_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        let committer = Committer::start(store.db.clone(), true).unwrap();
        let create = |key: &str| {
            let mut batch = WriteBatch::new();
            batch.expect(Table::Users, key.as_bytes().to_vec(), None);
            batch.put(Table::Users, key.as_bytes().to_vec(), b"v".to_vec());
            batch
        };

        let inline = std::pin::pin!(committer.write(create("a"), Durability::Deferred));
        assert!(matches!(poll_once(inline), std::task::Poll::Ready(Ok(()))), "written in its first poll");
        let conflict = std::pin::pin!(committer.write(create("a"), Durability::Deferred));
        assert!(
            matches!(poll_once(conflict), std::task::Poll::Ready(Err(StorageError::Conflict))),
            "an inline write's conditions are checked"
        );
        let synced = std::pin::pin!(committer.write(create("b"), Durability::Configured));
        assert!(poll_once(synced).is_pending(), "a write that must be synced is queued");

        let group = committer.applying.lock().unwrap();
        let mut queued = std::pin::pin!(committer.write(create("c"), Durability::Deferred));
        assert!(poll_once(queued.as_mut()).is_pending(), "queued behind the group being written");
        drop(group);
        queued.await.unwrap();
        let stored = |key: &[u8]| store.db.get_cf(cf(&store.db, Table::Users), key).unwrap();
        assert_eq!(stored(b"c"), Some(b"v".to_vec()));
    }

    fn outcome(mut receiver: oneshot::Receiver<Result<(), StorageError>>) -> Result<(), StorageError> {
        receiver.try_recv().expect("answered when the group is written")
    }

    #[test]
    fn each_batch_in_a_group_sees_the_writes_of_the_batches_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        let key = || b"k".to_vec();
        let mut create = WriteBatch::new();
        create.expect(Table::Users, key(), None);
        create.put(Table::Users, key(), b"1".to_vec());
        let mut update = WriteBatch::new();
        update.expect(Table::Users, key(), Some(b"1".to_vec()));
        update.put(Table::Users, key(), b"2".to_vec());
        let mut stale = WriteBatch::new();
        stale.expect(Table::Users, key(), None);
        stale.put(Table::Users, b"stale".to_vec(), b"written".to_vec());
        let mut remove = WriteBatch::new();
        remove.expect(Table::Users, key(), Some(b"2".to_vec()));
        remove.delete(Table::Users, key());
        let mut after_remove = WriteBatch::new();
        after_remove.expect(Table::Users, key(), None);
        after_remove.put(Table::Users, b"after".to_vec(), b"written".to_vec());

        let batches = [create, update, stale, remove, after_remove];
        let (group, answers): (Vec<_>, Vec<_>) = batches.into_iter().map(queued).unzip();
        commit(&store.db, group, false);
        let outcomes: Vec<_> = answers.into_iter().map(outcome).collect();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
        assert!(matches!(outcomes[2], Err(StorageError::Conflict)), "the key exists after the first batch");
        assert!(outcomes[3].is_ok() && outcomes[4].is_ok(), "{outcomes:?}");
        let stored = |key: &[u8]| store.db.get_cf(cf(&store.db, Table::Users), key).unwrap();
        assert_eq!(stored(b"k"), None);
        assert_eq!(stored(b"stale"), None, "a refused batch writes nothing");
        assert_eq!(stored(b"after"), Some(b"written".to_vec()));
    }
}
