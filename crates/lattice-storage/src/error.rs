use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    /// A conditional batch lost a race; the caller may re-read and retry.
    #[error("write conflict: a precondition of the batch no longer holds")]
    Conflict,
    /// A service reached for a table it does not own: a bug, never caused by input.
    #[error("service {owner} does not own table {table}")]
    NotOwned { owner: &'static str, table: &'static str },
    #[error("{what} over the limit of {limit}")]
    LimitExceeded { what: &'static str, limit: usize },
    #[error("database schema version {found} is newer than this binary supports ({supported}); upgrade Lattice")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("stored value in table {table} is corrupt: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("blocking storage task failed: {0}")]
    Task(String),
}
