//! The RocksDB backend: one column family per [`Table`], WAL always on, writes through one
//! committer thread that groups them (`group_commit.rs`).

use std::ops::{Bound, Deref};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, DB, IteratorMode, Options, ReadOptions, Snapshot};
use tokio::sync::watch;

use crate::group_commit::{Committer, Durability};
use crate::kv::{Direction, KeyRange, KvRead, KvStore, Row, WriteBatch, check_scan_limit};
use crate::{StorageError, Table};

/// Scans longer than this run on a blocking thread instead of the async worker.
const INLINE_SCAN_ROWS: usize = 256;

#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// fsync the WAL before acknowledging a write: survives power loss, not only a process
    /// crash. Writers that arrive together share one fsync (group commit).
    pub sync_writes: bool,
    /// Block cache shared by all tables, in bytes.
    pub block_cache_bytes: usize,
    /// For tests only: keep the WAL in this process's memory until a synced write or
    /// [`KvStore::flush`] writes it out, so a SIGKILL loses unsynced writes exactly as a power cut
    /// loses what the operating system had not yet written to disk.
    pub wal_in_process_memory: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self { sync_writes: true, block_cache_bytes: 8 << 20, wal_in_process_memory: false }
    }
}

pub struct RocksStore {
    pub(crate) db: Arc<OpenDb>,
    /// Every write goes through it, which is what makes a batch's condition check and its write
    /// one step.
    committer: Committer,
    closed: watch::Receiver<()>,
}

/// The open database. Scans on blocking threads, snapshots and the committer thread hold it too,
/// so it closes when the last of them lets go; then `_closed` is dropped, which tells
/// [`StoreClosed`] waiters.
pub(crate) struct OpenDb {
    // Fields drop in order: the database (and its LOCK file) first, then the signal.
    db: DB,
    _closed: watch::Sender<()>,
}

impl Deref for OpenDb {
    type Target = DB;

    fn deref(&self) -> &DB {
        &self.db
    }
}

/// Completes once a [`RocksStore`]'s database is closed and its directory can be opened again.
pub struct StoreClosed(watch::Receiver<()>);

impl StoreClosed {
    pub async fn wait(mut self) {
        // Nothing is ever sent: `changed` fails exactly when the sender, inside the database
        // handle, is dropped.
        while self.0.changed().await.is_ok() {}
    }
}

impl RocksStore {
    pub fn open(path: &Path, options: &RocksOptions) -> Result<Self, StorageError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_open_files(256);
        db_options.set_keep_log_file_num(4);
        // Small memtables keep the idle footprint low; RocksDB grows them into more files, not RAM.
        db_options.set_write_buffer_size(4 << 20);
        db_options.set_max_write_buffer_number(2);
        db_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_options.set_manual_wal_flush(options.wal_in_process_memory);
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let descriptors = Table::ALL.iter().map(|table| {
            let mut cf_options = Options::default();
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            cf_options.set_block_based_table_factory(&block);
            cf_options.set_write_buffer_size(2 << 20);
            cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(table.name(), cf_options)
        });
        let db = DB::open_cf_descriptors(&db_options, path, descriptors)?;
        let (closed_tx, closed) = watch::channel(());
        let db = Arc::new(OpenDb { db, _closed: closed_tx });
        let committer = Committer::start(db.clone(), options.sync_writes)?;
        Ok(Self { db, committer, closed })
    }

    /// What completes once this store and every handle derived from it (snapshots, scans still
    /// running) are dropped and the database is closed.
    pub fn closed(&self) -> StoreClosed {
        StoreClosed(self.closed.clone())
    }
}

pub(crate) fn cf(db: &DB, table: Table) -> &rocksdb::ColumnFamily {
    // Every table's column family is created at open, so a missing one is a programming error.
    db.cf_handle(table.name()).expect("column family created at open")
}

fn read_options(range: &KeyRange) -> ReadOptions {
    let mut options = ReadOptions::default();
    match &range.start {
        Bound::Included(k) => options.set_iterate_lower_bound(k.clone()),
        Bound::Excluded(k) => options.set_iterate_lower_bound(successor(k)),
        Bound::Unbounded => {}
    }
    match &range.end {
        Bound::Included(k) => options.set_iterate_upper_bound(successor(k)),
        Bound::Excluded(k) => options.set_iterate_upper_bound(k.clone()),
        Bound::Unbounded => {}
    }
    options
}

/// The immediate successor of `key` in byte order.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

fn mode(direction: Direction) -> IteratorMode<'static> {
    match direction {
        Direction::Forward => IteratorMode::Start,
        Direction::Backward => IteratorMode::End,
    }
}

fn collect_rows<I>(iter: I, limit: usize) -> Result<Vec<Row>, StorageError>
where
    I: Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
{
    let mut rows = Vec::new();
    for item in iter.take(limit) {
        let (key, value) = item?;
        rows.push((key.into_vec(), value.into_vec()));
    }
    Ok(rows)
}

fn scan_db(
    db: &DB,
    table: Table,
    range: &KeyRange,
    direction: Direction,
    limit: usize,
) -> Result<Vec<Row>, StorageError> {
    let iter = db.iterator_cf_opt(cf(db, table), read_options(range), mode(direction));
    collect_rows(iter, limit)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StorageError::Task(e.to_string()))?
}

#[async_trait]
impl KvRead for RocksStore {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(cf(&self.db, table), key)?)
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        check_scan_limit(limit)?;
        if limit <= INLINE_SCAN_ROWS {
            return scan_db(&self.db, table, range, direction, limit);
        }
        let (db, range) = (self.db.clone(), range.clone());
        blocking(move || scan_db(&db, table, &range, direction, limit)).await
    }
}

#[async_trait]
impl KvStore for RocksStore {
    async fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.committer.write(batch, Durability::Configured).await
    }

    async fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.committer.write(batch, Durability::Synced).await
    }

    async fn write_deferred(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.committer.write(batch, Durability::Deferred).await
    }

    async fn snapshot(&self) -> Result<Box<dyn KvRead>, StorageError> {
        Ok(Box::new(RocksSnapshot(SnapshotCell::new(self.db.clone(), |db| db.snapshot()))))
    }

    async fn flush(&self) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            db.flush_wal(true)?;
            Ok(())
        })
        .await
    }
}

type DbSnapshot<'a> = Snapshot<'a>;

self_cell::self_cell!(
    /// A RocksDB snapshot together with the database handle it borrows from.
    struct SnapshotCell {
        owner: Arc<OpenDb>,
        #[covariant]
        dependent: DbSnapshot,
    }
);

struct RocksSnapshot(SnapshotCell);

#[async_trait]
impl KvRead for RocksSnapshot {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let db = self.0.borrow_owner();
        Ok(self.0.borrow_dependent().get_cf(cf(db, table), key)?)
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        check_scan_limit(limit)?;
        let db = self.0.borrow_owner();
        let iter = self.0.borrow_dependent().iterator_cf_opt(cf(db, table), read_options(range), mode(direction));
        collect_rows(iter, limit)
    }
}
