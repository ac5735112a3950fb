//! A view of the store limited to the tables one domain service owns.
//!
//! Each service of `lattice-service` gets a [`ScopedStore`] naming its tables. Reading or
//! writing any other table fails with [`StorageError::NotOwned`], so "a service never writes
//! another's tables" is checked on every call rather than left to review. Writes that must be
//! atomic across services are composed above the services and committed through the whole store.

use std::sync::Arc;

use async_trait::async_trait;

use crate::kv::{Direction, KeyRange, KvRead, KvStore, Row, WriteBatch, WriteOp};
use crate::{StorageError, Table};

/// The tables of one owner, named for error messages.
#[derive(Clone, Copy, Debug)]
pub struct TableScope {
    pub owner: &'static str,
    pub tables: &'static [Table],
}

impl TableScope {
    pub fn check(&self, table: Table) -> Result<(), StorageError> {
        if self.tables.contains(&table) {
            Ok(())
        } else {
            Err(StorageError::NotOwned { owner: self.owner, table: table.name() })
        }
    }

    /// Every table a batch writes or conditions on must be in scope.
    pub fn check_batch(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        for op in &batch.ops {
            let (WriteOp::Put { table, .. } | WriteOp::Delete { table, .. }) = op;
            self.check(*table)?;
        }
        batch.conditions.iter().try_for_each(|condition| self.check(condition.table))
    }
}

/// A [`KvStore`] that passes through only the tables of its scope.
pub struct ScopedStore {
    inner: Arc<dyn KvStore>,
    scope: TableScope,
}

impl ScopedStore {
    pub fn new(inner: Arc<dyn KvStore>, scope: TableScope) -> Arc<Self> {
        Arc::new(Self { inner, scope })
    }

    pub fn scope(&self) -> TableScope {
        self.scope
    }
}

#[async_trait]
impl KvRead for ScopedStore {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        scoped_get(self.scope, self.inner.as_ref(), table, key).await
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        scoped_scan(self.scope, self.inner.as_ref(), table, range, direction, limit).await
    }
}

#[async_trait]
impl KvStore for ScopedStore {
    async fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.scope.check_batch(&batch)?;
        self.inner.write(batch).await
    }

    async fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.scope.check_batch(&batch)?;
        self.inner.write_synced(batch).await
    }

    async fn write_deferred(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.scope.check_batch(&batch)?;
        self.inner.write_deferred(batch).await
    }

    async fn snapshot(&self) -> Result<Box<dyn KvRead>, StorageError> {
        Ok(Box::new(ScopedRead { inner: self.inner.snapshot().await?, scope: self.scope }))
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush().await
    }
}

/// A snapshot seen through a scope.
struct ScopedRead {
    inner: Box<dyn KvRead>,
    scope: TableScope,
}

#[async_trait]
impl KvRead for ScopedRead {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        scoped_get(self.scope, self.inner.as_ref(), table, key).await
    }

    async fn scan(
        &self,
        table: Table,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        scoped_scan(self.scope, self.inner.as_ref(), table, range, direction, limit).await
    }
}

async fn scoped_get(
    scope: TableScope,
    inner: &dyn KvRead,
    table: Table,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StorageError> {
    scope.check(table)?;
    inner.get(table, key).await
}

async fn scoped_scan(
    scope: TableScope,
    inner: &dyn KvRead,
    table: Table,
    range: &KeyRange,
    direction: Direction,
    limit: usize,
) -> Result<Vec<Row>, StorageError> {
    scope.check(table)?;
    inner.scan(table, range, direction, limit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    const SCOPE: TableScope = TableScope { owner: "accounts", tables: &[Table::Users, Table::Devices] };

    fn store() -> Arc<ScopedStore> {
        ScopedStore::new(Arc::new(MemoryStore::new()), SCOPE)
    }

    #[tokio::test]
    async fn reads_and_writes_of_owned_tables_pass_through() {
        let store = store();
        let mut batch = WriteBatch::new();
        batch.put(Table::Users, b"u".to_vec(), b"1".to_vec());
        batch.expect(Table::Devices, b"d".to_vec(), None);
        store.write(batch).await.expect("owned tables are writable");
        assert_eq!(store.get(Table::Users, b"u").await.expect("readable"), Some(b"1".to_vec()));
        let snapshot = store.snapshot().await.expect("snapshot");
        assert_eq!(snapshot.get(Table::Users, b"u").await.expect("readable"), Some(b"1".to_vec()));
    }

    #[tokio::test]
    async fn another_services_table_is_refused_and_nothing_is_written() {
        let store = store();
        let mut batch = WriteBatch::new();
        batch.put(Table::Users, b"u".to_vec(), b"1".to_vec());
        batch.put(Table::Events, b"e".to_vec(), b"1".to_vec());
        let refused = store.write(batch).await.expect_err("a foreign table in the batch");
        assert!(matches!(refused, StorageError::NotOwned { owner: "accounts", table: "events" }));
        assert_eq!(store.get(Table::Users, b"u").await.expect("readable"), None);

        let mut conditioned = WriteBatch::new();
        conditioned.put(Table::Users, b"u".to_vec(), b"1".to_vec());
        conditioned.expect(Table::Rooms, b"r".to_vec(), None);
        assert!(store.write(conditioned).await.is_err(), "a condition on a foreign table");

        assert!(store.get(Table::Events, b"e").await.is_err());
        assert!(store.scan(Table::Rooms, &KeyRange::all(), Direction::Forward, 1).await.is_err());
        let snapshot = store.snapshot().await.expect("snapshot");
        assert!(snapshot.get(Table::Events, b"e").await.is_err());
    }
}
