//! An in-memory store for tests, with the same semantics as the RocksDB one.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::kv::{Direction, KeyRange, KvRead, KvStore, Row, WriteBatch, WriteOp, check_scan_limit};
use crate::{StorageError, Table};

type Tables = HashMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
pub struct MemoryStore {
    tables: RwLock<Tables>,
    rows_read: AtomicU64,
    rows_written: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows read so far: one per `get`, one per row a scan returns (at least one per scan).
    /// Lets tests prove what a request costs.
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }

    /// Rows written or deleted so far by successful batches: lets tests prove what a write costs.
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::Relaxed)
    }
}

fn read_tables(lock: &RwLock<Tables>) -> std::sync::RwLockReadGuard<'_, Tables> {
    // A panic while holding the lock cannot leave a half-applied batch (batches are applied
    // after all checks), so a poisoned lock still guards consistent data.
    lock.read().unwrap_or_else(|poison| poison.into_inner())
}

fn scan_map(
    map: Option<&BTreeMap<Vec<u8>, Vec<u8>>>,
    range: &KeyRange,
    direction: Direction,
    limit: usize,
) -> Vec<Row> {
    let Some(map) = map.filter(|_| !range.is_inverted()) else { return Vec::new() };
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (as_ref(&range.start), as_ref(&range.end));
    let iter = map.range::<[u8], _>(bounds).map(|(k, v)| (k.clone(), v.clone()));
    match direction {
        Direction::Forward => iter.take(limit).collect(),
        Direction::Backward => iter.rev().take(limit).collect(),
    }
}

fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

#[async_trait]
impl KvRead for MemoryStore {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.rows_read.fetch_add(1, Ordering::Relaxed);
        Ok(read_tables(&self.tables).get(&table).and_then(|m| m.get(key).cloned()))
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        check_scan_limit(limit)?;
        let rows = scan_map(read_tables(&self.tables).get(&table), range, direction, limit);
        self.rows_read.fetch_add(rows.len().max(1) as u64, Ordering::Relaxed);
        Ok(rows)
    }
}

#[async_trait]
impl KvStore for MemoryStore {
    async fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut tables = self.tables.write().unwrap_or_else(|poison| poison.into_inner());
        for condition in &batch.conditions {
            let current = tables.get(&condition.table).and_then(|m| m.get(&condition.key));
            if current != condition.expected.as_ref() {
                return Err(StorageError::Conflict);
            }
        }
        self.rows_written.fetch_add(batch.ops.len() as u64, Ordering::Relaxed);
        for op in batch.ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    tables.entry(table).or_default().insert(key, value);
                }
                WriteOp::Delete { table, key } => {
                    tables.entry(table).or_default().remove(&key);
                }
            }
        }
        Ok(())
    }

    async fn snapshot(&self) -> Result<Box<dyn KvRead>, StorageError> {
        let copy = read_tables(&self.tables).clone();
        Ok(Box::new(MemorySnapshot { tables: Arc::new(copy) }))
    }

    async fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write(batch).await
    }

    async fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

struct MemorySnapshot {
    tables: Arc<Tables>,
}

#[async_trait]
impl KvRead for MemorySnapshot {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tables.get(&table).and_then(|m| m.get(key).cloned()))
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        check_scan_limit(limit)?;
        Ok(scan_map(self.tables.get(&table), range, direction, limit))
    }
}
