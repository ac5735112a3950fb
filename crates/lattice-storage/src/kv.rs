//! The ordered key-value interface every backend implements.
//!
//! This is the seam for scale-out (see `docs/architecture.md`): it is async so that a
//! network-backed store fits, and correctness under concurrency comes from conditional
//! batches, never from process-local locks held by callers.

use std::ops::Bound;

use async_trait::async_trait;

use crate::{StorageError, Table};

/// Upper bound on the rows one scan may return; callers page with ranges beyond this.
pub const MAX_SCAN_ROWS: usize = 10_000;

/// A contiguous range of keys in one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bound<Vec<u8>>,
    pub end: Bound<Vec<u8>>,
}

impl KeyRange {
    /// Every key of the table.
    pub fn all() -> Self {
        Self { start: Bound::Unbounded, end: Bound::Unbounded }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        Self { start: Bound::Included(prefix.to_vec()), end: prefix_end(prefix) }
    }

    /// Keys in `[start, end)`.
    pub fn between(start: &[u8], end: &[u8]) -> Self {
        Self { start: Bound::Included(start.to_vec()), end: Bound::Excluded(end.to_vec()) }
    }

    /// Whether no key can lie in the range (start after end); scanning it yields nothing.
    pub fn is_inverted(&self) -> bool {
        match (&self.start, &self.end) {
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e)) => s >= e,
            _ => false,
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        let after_start = match &self.start {
            Bound::Included(s) => key >= s.as_slice(),
            Bound::Excluded(s) => key > s.as_slice(),
            Bound::Unbounded => true,
        };
        let before_end = match &self.end {
            Bound::Included(e) => key <= e.as_slice(),
            Bound::Excluded(e) => key < e.as_slice(),
            Bound::Unbounded => true,
        };
        after_start && before_end
    }
}

/// The smallest key greater than every key starting with `prefix`, if one exists.
fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// One key/value row returned by a scan.
pub type Row = (Vec<u8>, Vec<u8>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put { table: Table, key: Vec<u8>, value: Vec<u8> },
    Delete { table: Table, key: Vec<u8> },
}

/// A precondition of a batch: `key` must currently hold `expected` (`None`: must be absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub table: Table,
    pub key: Vec<u8>,
    pub expected: Option<Vec<u8>>,
}

/// Writes applied all together or not at all, guarded by optional preconditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
    pub conditions: Vec<Condition>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(WriteOp::Put { table, key, value });
    }

    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.ops.push(WriteOp::Delete { table, key });
    }

    /// The batch only applies if `key` still holds `expected` when it is written.
    pub fn expect(&mut self, table: Table, key: Vec<u8>, expected: Option<Vec<u8>>) {
        self.conditions.push(Condition { table, key, expected });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Consistent reads: everything seen through a snapshot is from one point in time.
#[async_trait]
pub trait KvRead: Send + Sync {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Up to `limit` rows of `range` in key order (or reverse order), `limit <= MAX_SCAN_ROWS`.
    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError>;
}

/// An ordered key-value store with atomic, conditional batches.
#[async_trait]
pub trait KvStore: KvRead {
    /// Applies the whole batch atomically, or fails with [`StorageError::Conflict`] without
    /// writing anything when a condition does not hold.
    ///
    /// Writes apply in the order they are submitted, even when a caller stops waiting: a write
    /// submitted after another (whose call was polled at least once) is answered only after that
    /// one is applied or refused. Abandoned stream positions rely on it (`positions.rs`).
    async fn write(&self, batch: WriteBatch) -> Result<(), StorageError>;

    /// [`KvStore::write`], durable on disk before it returns and before any reader sees it,
    /// whatever `sync_writes` says. For the rare writes that promise something about the future
    /// (counter reservations).
    async fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError>;

    /// [`KvStore::write`], applied and visible at once but made durable only by the next durable
    /// write (any writer's) or [`KvStore::flush`]: a process crash loses nothing, a power cut may.
    /// For a run of writes acknowledged together once a durable write ends it (a federation
    /// transaction's events): the store's log is written and synced in order, so that last write
    /// makes all of them durable with one sync. A backend without the distinction writes as
    /// [`KvStore::write`] does.
    async fn write_deferred(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write(batch).await
    }

    /// A read-only view of the store as it is now, unaffected by later writes.
    async fn snapshot(&self) -> Result<Box<dyn KvRead>, StorageError>;

    /// Makes every acknowledged write durable on disk (called at shutdown).
    async fn flush(&self) -> Result<(), StorageError>;
}

pub(crate) fn check_scan_limit(limit: usize) -> Result<(), StorageError> {
    if limit > MAX_SCAN_ROWS {
        return Err(StorageError::LimitExceeded { what: "scan rows", limit: MAX_SCAN_ROWS });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_covers_exactly_the_prefix() {
        let range = KeyRange::prefix(b"ab");
        assert!(range.contains(b"ab"));
        assert!(range.contains(b"ab\xff\xff"));
        assert!(!range.contains(b"ac"));
        assert!(!range.contains(b"aa\xff"));
    }

    #[test]
    fn prefix_of_max_bytes_is_unbounded_above() {
        let range = KeyRange::prefix(b"\xff\xff");
        assert_eq!(range.end, Bound::Unbounded);
        assert!(range.contains(b"\xff\xff\x01"));
        assert!(!range.contains(b"\xff\xfe"));
    }
}
