//! Typed records over the raw key-value interface. Values are JSON: readable in a debugger,
//! and serde's defaults let a newer binary read records an older one wrote.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::kv::{Direction, KeyRange, KvRead, KvStore, Row, WriteBatch};
use crate::{StorageError, Table};

/// A value stored in exactly one table.
pub trait Record: Serialize + DeserializeOwned {
    const TABLE: Table;
}

/// A record as read, with its stored bytes so a later batch can require it to be unchanged.
#[derive(Clone, Debug)]
pub struct Fetched<R> {
    pub value: R,
    pub raw: Vec<u8>,
}

fn decode<R: Record>(raw: &[u8]) -> Result<R, StorageError> {
    serde_json::from_slice(raw).map_err(|e| StorageError::Corrupt { table: R::TABLE.name(), detail: e.to_string() })
}

fn encode<R: Record>(value: &R) -> Vec<u8> {
    // Records are plain structs of strings, numbers and maps: serialising them cannot fail.
    serde_json::to_vec(value).expect("records serialise to JSON")
}

pub async fn get<R: Record>(kv: &dyn KvRead, key: &[u8]) -> Result<Option<Fetched<R>>, StorageError> {
    match kv.get(R::TABLE, key).await? {
        Some(raw) => Ok(Some(Fetched { value: decode(&raw)?, raw })),
        None => Ok(None),
    }
}

pub fn put<R: Record>(batch: &mut WriteBatch, key: Vec<u8>, value: &R) {
    batch.put(R::TABLE, key, encode(value));
}

/// Up to `limit` records whose keys start with `prefix`, in key order.
pub async fn scan_prefix<R: Record>(
    kv: &dyn KvRead,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, R)>, StorageError> {
    let rows = kv.scan(R::TABLE, &KeyRange::prefix(prefix), Direction::Forward, limit).await?;
    rows.into_iter().map(|(key, raw)| Ok((key, decode(&raw)?))).collect()
}

/// Every row of `range`, in key order, read in pages of [`MAX_SCAN_ROWS`](crate::MAX_SCAN_ROWS):
/// for reads that must not stop at a page (a room's whole state, a user's rooms).
pub async fn scan_all(kv: &dyn KvRead, table: Table, range: &KeyRange) -> Result<Vec<Row>, StorageError> {
    let mut rows = Vec::new();
    let mut page_range = range.clone();
    loop {
        let page = kv.scan(table, &page_range, Direction::Forward, crate::MAX_SCAN_ROWS).await?;
        let full = page.len() == crate::MAX_SCAN_ROWS;
        if let Some((last, _)) = page.last() {
            page_range.start = std::ops::Bound::Excluded(last.clone());
        }
        rows.extend(page);
        if !full {
            return Ok(rows);
        }
    }
}

/// Reads the named counter and adds its increment to `batch`, conditional on the value read:
/// the new value is taken only if the batch commits, and a concurrent taker makes the batch
/// fail with `Conflict` (the caller retries). Returns the new value.
pub async fn counter_in_batch(kv: &dyn KvStore, batch: &mut WriteBatch, name: &str) -> Result<u64, StorageError> {
    let key = crate::keys::counter(name);
    let current = kv.get(Table::Counters, &key).await?;
    let next = counter_value(name, current.as_deref())?
        .checked_add(1)
        .ok_or(StorageError::LimitExceeded { what: "counter", limit: usize::MAX })?;
    reserve(kv, name, next).await?;
    batch.expect(Table::Counters, key.clone(), current);
    batch.put(Table::Counters, key, next.to_be_bytes().to_vec());
    Ok(next)
}

/// Counter values are reserved on disk this many at a time: one synced write per block.
pub const COUNTER_RESERVATION_BLOCK: u64 = 1_000;

/// Makes `value` lie within the named counter's durable reservation before any batch can
/// write it, so that after a power loss (which, without `sync_writes`, may drop the last
/// writes, counters included) [`recover_counters`] can move the counter past every value a
/// client may have seen. Without this a stream position could be handed out twice.
async fn reserve(kv: &dyn KvStore, name: &str, value: u64) -> Result<(), StorageError> {
    let key = crate::keys::counter_reservation(name);
    for _ in 0..COUNTER_RETRIES {
        let raw = kv.get(Table::Counters, &key).await?;
        if counter_value(name, raw.as_deref())? >= value {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.expect(Table::Counters, key.clone(), raw);
        batch.put(Table::Counters, key.clone(), value.saturating_add(COUNTER_RESERVATION_BLOCK).to_be_bytes().to_vec());
        match kv.write_synced(batch).await {
            Ok(()) => return Ok(()),
            Err(StorageError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Conflict)
}

/// Run when the store opens, before anything takes a counter: moves every counter up to its
/// durable reservation. A clean shutdown leaves a counter below it too, so each start skips at
/// most [`COUNTER_RESERVATION_BLOCK`] values of each counter; that is the price of never
/// handing out a value twice. Returns how many counters moved.
pub async fn recover_counters(kv: &dyn KvStore) -> Result<usize, StorageError> {
    let prefix = [crate::keys::COUNTER_RESERVATION_PREFIX];
    let mut range = KeyRange::prefix(&prefix);
    let mut moved = 0;
    loop {
        let rows = kv.scan(Table::Counters, &range, Direction::Forward, crate::MAX_SCAN_ROWS).await?;
        let Some((last, _)) = rows.last() else { return Ok(moved) };
        range.start = std::ops::Bound::Excluded(last.clone());
        let mut batch = WriteBatch::new();
        for (key, raw) in &rows {
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let reserved = counter_value(&name, Some(raw))?;
            if counter(kv, &name).await? < reserved {
                batch.put(Table::Counters, crate::keys::counter(&name), reserved.to_be_bytes().to_vec());
            }
        }
        moved += batch.ops.len();
        if !batch.is_empty() {
            kv.write_synced(batch).await?;
        }
        if rows.len() < crate::MAX_SCAN_ROWS {
            return Ok(moved);
        }
    }
}

/// The named counter's current value (0 before its first increment).
pub async fn counter(kv: &dyn KvRead, name: &str) -> Result<u64, StorageError> {
    let raw = kv.get(Table::Counters, &crate::keys::counter(name)).await?;
    counter_value(name, raw.as_deref())
}

pub(crate) fn counter_value(name: &str, raw: Option<&[u8]>) -> Result<u64, StorageError> {
    match raw {
        Some(raw) => Ok(u64::from_be_bytes(raw.try_into().map_err(|_| StorageError::Corrupt {
            table: Table::Counters.name(),
            detail: format!("counter {name} is {} bytes", raw.len()),
        })?)),
        None => Ok(0),
    }
}

/// How often a counter increment is retried when other writers keep winning the race.
const COUNTER_RETRIES: usize = 64;

/// In-process locks that line up the callers of [`next_counter`] per counter name (hashed onto a
/// few stripes). They only save wasted work: with group commit, racing increments would mostly
/// meet in one group, where all but one fail their condition and go round again. The batch's
/// condition stays the guarantee (across processes, too).
static COUNTER_LOCKS: [tokio::sync::Mutex<()>; 16] = [const { tokio::sync::Mutex::const_new(()) }; 16];

fn counter_lock(name: &str) -> &'static tokio::sync::Mutex<()> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut hasher);
    &COUNTER_LOCKS[(hasher.finish() as usize) % COUNTER_LOCKS.len()]
}

/// Atomically increments the named counter and returns its new value (the first is 1).
pub async fn next_counter(kv: &dyn KvStore, name: &str) -> Result<u64, StorageError> {
    let _line_up = counter_lock(name).lock().await;
    for _ in 0..COUNTER_RETRIES {
        let mut batch = WriteBatch::new();
        let next = counter_in_batch(kv, &mut batch, name).await?;
        match kv.write(batch).await {
            Ok(()) => return Ok(next),
            Err(StorageError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Conflict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scan_all_reads_past_one_page() {
        let kv = crate::MemoryStore::new();
        let rows = crate::MAX_SCAN_ROWS * 2 + 3;
        let mut batch = WriteBatch::new();
        for i in 0..rows as u32 {
            batch.put(Table::Memberships, [b"u\0".as_slice(), &i.to_be_bytes()].concat(), vec![]);
        }
        batch.put(Table::Memberships, b"v\0other".to_vec(), vec![]);
        kv.write(batch).await.unwrap();
        let all = scan_all(&kv, Table::Memberships, &KeyRange::prefix(b"u\0")).await.unwrap();
        assert_eq!(all.len(), rows);
        assert!(all.windows(2).all(|pair| pair[0].0 < pair[1].0), "in key order, no repeats");
    }
}
