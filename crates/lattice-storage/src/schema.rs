//! The schema version stored in the database, checked (and migrated) at open.
//!
//! A migration is a list of steps. Each step walks one table in key order, in chunks of a bounded
//! number of rows; a chunk's writes and the step's new cursor go into one batch, so a crash
//! resumes after the last finished chunk, and a chunk that failed before its write simply runs
//! again. The version is bumped only once every step is done. Every batch requires the stored
//! version and the progress row to be what this process last read, so two processes cannot both
//! migrate: the second one's next batch fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::kv::{Direction, KeyRange, KvRead, KvStore, MAX_SCAN_ROWS, WriteBatch, WriteOp};
use crate::{StorageError, Table, keys};

/// The layout this binary reads and writes. Bump it with a migration the binary passes to
/// [`open_schema`].
pub const SCHEMA_VERSION: u32 = 5;

/// Rows one chunk of a migration step reads unless configured otherwise.
pub const DEFAULT_MIGRATION_CHUNK_ROWS: usize = 1_000;

/// One pass of a migration over one table: what it walks and writes (for the runner and its
/// progress log), and the rewrite applied to every row.
#[derive(Clone)]
pub struct MigrationStep {
    /// Stable name, logged.
    pub name: &'static str,
    /// The table walked.
    pub reads: Table,
    /// The tables written, for the progress log.
    pub writes: &'static [Table],
    pub rewrite: Arc<dyn RowRewrite>,
}

impl MigrationStep {
    pub fn new(name: &'static str, reads: Table, writes: &'static [Table], rewrite: impl RowRewrite + 'static) -> Self {
        MigrationStep { name, reads, writes, rewrite: Arc::new(rewrite) }
    }

    /// A step that deletes every row of `table`, which is no longer used.
    pub fn drop_table(name: &'static str, table: Table, writes: &'static [Table]) -> Self {
        MigrationStep::new(name, table, writes, DropRows(table))
    }
}

/// What a migration step does to each row. `row` is called for every row, in key order, with
/// the batch of the row's chunk; it must be idempotent, since a chunk interrupted before its
/// write runs again. Reads see the store as it was before the chunk: to see what earlier rows of
/// the same chunk wrote, read through [`read_through`].
#[async_trait]
pub trait RowRewrite: Send + Sync {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], value: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError>;
}

/// Turns the store from schema `from` into `from + 1`, step by step.
pub struct Migration {
    pub from: u32,
    pub describe: &'static str,
    pub steps: Vec<MigrationStep>,
}

const VERSION_KEY: &str = "schema_version";
/// Where an unfinished migration stands (absent when none is running).
const PROGRESS_KEY: &str = "migration_progress";

/// The progress row: the step under way and the last key it finished.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Progress {
    to: u32,
    step: usize,
    cursor: Option<Vec<u8>>,
    rows: u64,
}

async fn stored_version(kv: &dyn KvStore) -> Result<Option<u32>, StorageError> {
    match kv.get(Table::Meta, &keys::meta(VERSION_KEY)).await? {
        None => Ok(None),
        Some(raw) => {
            let bytes: [u8; 4] = raw.as_slice().try_into().map_err(|_| StorageError::Corrupt {
                table: Table::Meta.name(),
                detail: "schema_version is not 4 bytes".into(),
            })?;
            Ok(Some(u32::from_be_bytes(bytes)))
        }
    }
}

fn set_version(batch: &mut WriteBatch, version: u32) {
    batch.put(Table::Meta, keys::meta(VERSION_KEY), version.to_be_bytes().to_vec());
}

/// Checks the stored schema against this binary's: stamps a new database, migrates an older
/// one with `migrations` in chunks of `chunk_rows`, refuses a newer one. Returns the version
/// found (`None` for a new database).
pub async fn open_schema(
    kv: &dyn KvStore,
    migrations: &[Migration],
    chunk_rows: usize,
) -> Result<Option<u32>, StorageError> {
    migrate_with(kv, SCHEMA_VERSION, migrations, chunk_rows).await
}

/// [`open_schema`] with an explicit target (tests use their own).
pub async fn migrate_with(
    kv: &dyn KvStore,
    target: u32,
    migrations: &[Migration],
    chunk_rows: usize,
) -> Result<Option<u32>, StorageError> {
    let found = stored_version(kv).await?;
    let Some(mut version) = found else {
        let mut batch = WriteBatch::new();
        batch.expect(Table::Meta, keys::meta(VERSION_KEY), None);
        set_version(&mut batch, target);
        kv.write(batch).await?;
        return Ok(None);
    };
    if version > target {
        return Err(StorageError::SchemaTooNew { found: version, supported: target });
    }
    let chunk_rows = chunk_rows.clamp(1, MAX_SCAN_ROWS);
    while version < target {
        let migration = migrations.iter().find(|m| m.from == version).ok_or_else(|| StorageError::Corrupt {
            table: Table::Meta.name(),
            detail: format!("no migration from schema version {version}"),
        })?;
        Runner { kv, migration, chunk_rows }.run().await?;
        version += 1;
    }
    Ok(found)
}

struct Runner<'a> {
    kv: &'a dyn KvStore,
    migration: &'a Migration,
    chunk_rows: usize,
}

/// How often a long step logs its progress at `info` (every chunk is logged at `debug`).
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl Runner<'_> {
    fn to(&self) -> u32 {
        self.migration.from + 1
    }

    async fn run(&self) -> Result<(), StorageError> {
        let (mut progress, mut raw) = self.load_progress().await?;
        let (from, to) = (self.migration.from, self.to());
        match &raw {
            None => tracing::info!(from, to, what = self.migration.describe, "migrating database schema"),
            Some(_) => tracing::info!(
                from,
                to,
                step = self.step_name(progress.step),
                rows_done = progress.rows,
                "resuming an interrupted schema migration"
            ),
        }
        while let Some(step) = self.migration.steps.get(progress.step) {
            (progress, raw) = self.run_step(step, progress, raw).await?;
        }
        let mut batch = self.guarded_batch(raw);
        batch.delete(Table::Meta, keys::meta(PROGRESS_KEY));
        set_version(&mut batch, to);
        self.kv.write(batch).await?;
        tracing::info!(from, to, "database schema migrated");
        Ok(())
    }

    fn step_name(&self, step: usize) -> &'static str {
        self.migration.steps.get(step).map_or("(done)", |s| s.name)
    }

    async fn load_progress(&self) -> Result<(Progress, Option<Vec<u8>>), StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt { table: Table::Meta.name(), detail };
        let Some(raw) = self.kv.get(Table::Meta, &keys::meta(PROGRESS_KEY)).await? else {
            return Ok((Progress { to: self.to(), ..Progress::default() }, None));
        };
        let progress: Progress = serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
        if progress.to != self.to() {
            return Err(corrupt(format!("migration progress is for schema {}, not {}", progress.to, self.to())));
        }
        Ok((progress, Some(raw)))
    }

    /// A batch that applies only while the version and the progress row are as this runner
    /// last saw them.
    fn guarded_batch(&self, progress_raw: Option<Vec<u8>>) -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch.expect(Table::Meta, keys::meta(VERSION_KEY), Some(self.migration.from.to_be_bytes().to_vec()));
        batch.expect(Table::Meta, keys::meta(PROGRESS_KEY), progress_raw);
        batch
    }

    /// Runs `step` chunk by chunk from `progress`; returns the progress pointing at the next step.
    async fn run_step(
        &self,
        step: &MigrationStep,
        mut progress: Progress,
        mut raw: Option<Vec<u8>>,
    ) -> Result<(Progress, Option<Vec<u8>>), StorageError> {
        let tables: Vec<&str> = step.writes.iter().map(|t| t.name()).collect();
        tracing::info!(step = step.name, reads = step.reads.name(), writes = ?tables, "migration step started");
        let started = Instant::now();
        let mut last_log = started;
        loop {
            let mut batch = self.guarded_batch(raw);
            let (rows, next) = self.chunk(step, progress.cursor.as_deref(), &mut batch).await?;
            progress.rows += rows;
            let rows_done = progress.rows;
            let finished = next.is_none();
            progress.cursor = next;
            if finished {
                progress = Progress { to: self.to(), step: progress.step + 1, cursor: None, rows: 0 };
            }
            let encoded = serde_json::to_vec(&progress).expect("progress serialises to JSON");
            batch.put(Table::Meta, keys::meta(PROGRESS_KEY), encoded.clone());
            self.kv.write(batch).await?;
            raw = Some(encoded);
            if finished {
                let elapsed_ms = started.elapsed().as_millis() as u64;
                tracing::info!(step = step.name, rows_done, elapsed_ms, "migration step done");
                return Ok((progress, raw));
            }
            tracing::debug!(step = step.name, rows_done, writes = ?tables, "migration progress");
            if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
                last_log = Instant::now();
                tracing::info!(step = step.name, rows_done, writes = ?tables, "migration progress");
            }
        }
    }

    /// One chunk: the rows after `cursor`, each handed to the step. Returns how many rows were
    /// read and the cursor of the next chunk (`None`: the step is done).
    async fn chunk(
        &self,
        step: &MigrationStep,
        cursor: Option<&[u8]>,
        batch: &mut WriteBatch,
    ) -> Result<(u64, Option<Vec<u8>>), StorageError> {
        let mut range = KeyRange::all();
        if let Some(cursor) = cursor {
            range.start = std::ops::Bound::Excluded(cursor.to_vec());
        }
        let rows = self.kv.scan(step.reads, &range, Direction::Forward, self.chunk_rows).await?;
        for (key, value) in &rows {
            step.rewrite.row(self.kv, key, value, batch).await?;
        }
        let next = if rows.len() == self.chunk_rows { rows.last().map(|(key, _)| key.clone()) } else { None };
        Ok((rows.len() as u64, next))
    }
}

/// The value `key` will hold once `batch` is written: its last write in the batch, else what the
/// store holds.
pub async fn read_through(
    kv: &dyn KvRead,
    batch: &WriteBatch,
    table: Table,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StorageError> {
    let pending = batch.ops.iter().rev().find_map(|op| match op {
        WriteOp::Put { table: t, key: k, value } if *t == table && k == key => Some(Some(value.clone())),
        WriteOp::Delete { table: t, key: k } if *t == table && k == key => Some(None),
        _ => None,
    });
    match pending {
        Some(value) => Ok(value),
        None => kv.get(table, key).await,
    }
}

/// Deletes every row it is handed (see [`MigrationStep::drop_table`]).
struct DropRows(Table);

#[async_trait]
impl RowRewrite for DropRows {
    async fn row(&self, _: &dyn KvRead, key: &[u8], _: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        batch.delete(self.0, key.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::MemoryStore;

    /// Copies each `users` row to `profiles` (reversed value), failing once on the row
    /// `fail_on`, and counts the rows it was handed.
    struct CopyRows {
        fail_on: Option<Vec<u8>>,
        failed: AtomicUsize,
        seen: AtomicUsize,
    }

    #[async_trait]
    impl RowRewrite for CopyRows {
        async fn row(
            &self,
            _: &dyn KvRead,
            key: &[u8],
            value: &[u8],
            batch: &mut WriteBatch,
        ) -> Result<(), StorageError> {
            self.seen.fetch_add(1, Ordering::SeqCst);
            if self.fail_on.as_deref() == Some(key) && self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(StorageError::Task("injected failure".into()));
            }
            batch.put(Table::Profiles, key.to_vec(), value.iter().rev().copied().collect());
            Ok(())
        }
    }

    fn copy_step(fail_on: Option<&[u8]>) -> Arc<CopyRows> {
        Arc::new(CopyRows {
            fail_on: fail_on.map(<[u8]>::to_vec),
            failed: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
        })
    }

    async fn store_at_version(version: u32, rows: u8) -> MemoryStore {
        let kv = MemoryStore::new();
        let mut batch = WriteBatch::new();
        set_version(&mut batch, version);
        for i in 0..rows {
            batch.put(Table::Users, vec![b'u', i], vec![i, 1, 2]);
            batch.put(Table::AuthChains, vec![b'a', i], vec![i]);
        }
        kv.write(batch).await.unwrap();
        kv
    }

    async fn dump(kv: &MemoryStore) -> Vec<(Table, Vec<(Vec<u8>, Vec<u8>)>)> {
        let mut tables = Vec::new();
        for table in Table::ALL {
            tables.push((*table, crate::scan_all(kv, *table, &KeyRange::all()).await.unwrap()));
        }
        tables
    }

    fn migration(copy: Arc<CopyRows>) -> Migration {
        let copy = MigrationStep { name: "copy", reads: Table::Users, writes: &[Table::Profiles], rewrite: copy };
        let drop = MigrationStep::drop_table("drop", Table::AuthChains, &[Table::AuthChains]);
        Migration { from: 1, describe: "test", steps: vec![copy, drop] }
    }

    #[tokio::test]
    async fn a_failed_chunk_leaves_nothing_and_the_rerun_resumes_after_the_last_finished_chunk() {
        let uninterrupted = store_at_version(1, 10).await;
        migrate_with(&uninterrupted, 2, &[migration(copy_step(None))], 3).await.unwrap();

        let interrupted = store_at_version(1, 10).await;
        // Rows 0–2 and 3–5 finish; the chunk 6–8 fails on row 7.
        let failing = copy_step(Some(&[b'u', 7]));
        let error = migrate_with(&interrupted, 2, &[migration(failing.clone())], 3).await;
        assert!(matches!(error, Err(StorageError::Task(_))), "{error:?}");
        assert_eq!(stored_version(&interrupted).await.unwrap(), Some(1), "not bumped before every step is done");
        assert_eq!(interrupted.get(Table::Profiles, &[b'u', 6]).await.unwrap(), None, "the failed chunk wrote nothing");
        assert_eq!(interrupted.get(Table::Profiles, &[b'u', 5]).await.unwrap(), Some(vec![2, 1, 5]));

        migrate_with(&interrupted, 2, &[migration(failing.clone())], 3).await.unwrap();
        // 8 rows before the failure (0–7), then 6–9 again: finished chunks are not read twice.
        assert_eq!(failing.seen.load(Ordering::SeqCst), 8 + 4);
        assert_eq!(dump(&interrupted).await, dump(&uninterrupted).await);
        assert_eq!(stored_version(&interrupted).await.unwrap(), Some(2));
        assert_eq!(interrupted.get(Table::Meta, &keys::meta(PROGRESS_KEY)).await.unwrap(), None);
        assert!(crate::scan_all(&interrupted, Table::AuthChains, &KeyRange::all()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_second_migrator_fails_instead_of_migrating_twice() {
        let kv = store_at_version(1, 4).await;
        let runner_migration = migration(copy_step(None));
        let runner = Runner { kv: &kv, migration: &runner_migration, chunk_rows: 2 };
        let (progress, raw) = runner.load_progress().await.unwrap();
        // Another process finishes the whole migration meanwhile.
        migrate_with(&kv, 2, &[migration(copy_step(None))], 2).await.unwrap();
        let step = runner_migration.steps[0].clone();
        let result = runner.run_step(&step, progress, raw).await;
        assert!(matches!(result, Err(StorageError::Conflict)), "{result:?}");
    }

    #[tokio::test]
    async fn read_through_sees_the_batch_before_the_store() {
        let kv = store_at_version(1, 1).await;
        let mut batch = WriteBatch::new();
        assert_eq!(read_through(&kv, &batch, Table::Users, &[b'u', 0]).await.unwrap(), Some(vec![0, 1, 2]));
        batch.put(Table::Users, vec![b'u', 0], vec![9]);
        assert_eq!(read_through(&kv, &batch, Table::Users, &[b'u', 0]).await.unwrap(), Some(vec![9]));
        batch.delete(Table::Users, vec![b'u', 0]);
        assert_eq!(read_through(&kv, &batch, Table::Users, &[b'u', 0]).await.unwrap(), None);
    }
}
