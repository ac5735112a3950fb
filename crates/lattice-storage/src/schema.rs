//! The schema version stored in the database, checked (and migrated) at open.

use crate::kv::{KvStore, WriteBatch};
use crate::{StorageError, Table, keys};

/// The layout this binary reads and writes. Bump it with a migration in [`MIGRATIONS`].
pub const SCHEMA_VERSION: u32 = 1;

/// Turns the store from schema `from` into `from + 1` as one batch.
pub struct Migration {
    pub from: u32,
    pub describe: &'static str,
    pub build: fn() -> WriteBatch,
}

/// Migrations from older layouts, oldest first. Version 1 is the first released layout.
const MIGRATIONS: &[Migration] = &[];

const VERSION_KEY: &str = "schema_version";

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
/// one, refuses a newer one. Returns the version found (`None` for a new database).
pub async fn open_schema(kv: &dyn KvStore) -> Result<Option<u32>, StorageError> {
    migrate_with(kv, SCHEMA_VERSION, MIGRATIONS).await
}

/// [`open_schema`] with an explicit target and migration list (tests use their own).
pub async fn migrate_with(
    kv: &dyn KvStore,
    target: u32,
    migrations: &[Migration],
) -> Result<Option<u32>, StorageError> {
    let found = stored_version(kv).await?;
    let Some(mut version) = found else {
        let mut batch = WriteBatch::new();
        set_version(&mut batch, target);
        kv.write(batch).await?;
        return Ok(None);
    };
    if version > target {
        return Err(StorageError::SchemaTooNew { found: version, supported: target });
    }
    while version < target {
        let migration = migrations.iter().find(|m| m.from == version).ok_or_else(|| StorageError::Corrupt {
            table: Table::Meta.name(),
            detail: format!("no migration from schema version {version}"),
        })?;
        tracing::info!(from = version, to = version + 1, what = migration.describe, "migrating database schema");
        let mut batch = (migration.build)();
        // The version check rides in the same batch, so two processes cannot both migrate.
        batch.expect(Table::Meta, keys::meta(VERSION_KEY), Some(version.to_be_bytes().to_vec()));
        set_version(&mut batch, version + 1);
        kv.write(batch).await?;
        version += 1;
    }
    Ok(found)
}
