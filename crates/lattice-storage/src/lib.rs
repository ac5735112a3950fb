//! Lattice storage: a small ordered key-value interface ([`KvStore`]) with a RocksDB and an
//! in-memory backend, typed records over it, and the schema version check.
//!
//! No RocksDB type leaves this crate.

mod error;
mod group_commit;
pub mod keys;
mod kv;
mod memory;
mod positions;
pub mod records;
mod rocks;
mod schema;
mod scoped;
mod table;
mod typed;

pub use error::StorageError;
pub use kv::{Condition, Direction, KeyRange, KvRead, KvStore, MAX_SCAN_ROWS, Row, WriteBatch, WriteOp};
pub use memory::MemoryStore;
pub use positions::{StreamPosition, StreamPositions};
pub use rocks::{RocksOptions, RocksStore, StoreClosed};
pub use schema::{
    DEFAULT_MIGRATION_CHUNK_ROWS, Migration, MigrationStep, RowRewrite, SCHEMA_VERSION, migrate_with, open_schema,
    read_through,
};
pub use scoped::{ScopedStore, TableScope};
pub use table::Table;
pub use typed::{
    COUNTER_RESERVATION_BLOCK, Fetched, Record, counter, counter_in_batch, get, next_counter, put, recover_counters,
    scan_all, scan_prefix,
};

#[cfg(test)]
mod suite;
