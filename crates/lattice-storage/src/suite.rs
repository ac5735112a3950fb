//! One behaviour suite, run against every backend.

use std::sync::Arc;

use crate::kv::{Direction, KeyRange, KvRead, KvStore, WriteBatch};
use crate::{RocksOptions, RocksStore, StorageError, Table};

fn row(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

async fn put(kv: &dyn KvStore, table: Table, k: &str, v: &str) {
    let mut batch = WriteBatch::new();
    batch.put(table, k.into(), v.into());
    kv.write(batch).await.unwrap();
}

async fn get_put_delete(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    assert_eq!(kv.get(Table::Users, b"a").await.unwrap(), None);
    put(kv, Table::Users, "a", "1").await;
    assert_eq!(kv.get(Table::Users, b"a").await.unwrap(), Some(b"1".to_vec()));
    // Tables are separate key spaces.
    assert_eq!(kv.get(Table::Devices, b"a").await.unwrap(), None);
    let mut batch = WriteBatch::new();
    batch.delete(Table::Users, b"a".to_vec());
    kv.write(batch).await.unwrap();
    assert_eq!(kv.get(Table::Users, b"a").await.unwrap(), None);
}

async fn scans_in_both_directions(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    for k in ["a", "b\0x", "b\0y", "b\0z", "b\x01", "c"] {
        put(kv, Table::Devices, k, k).await;
    }
    let prefix = KeyRange::prefix(b"b\0");
    let forward = kv.scan(Table::Devices, &prefix, Direction::Forward, 10).await.unwrap();
    assert_eq!(forward, vec![row("b\0x", "b\0x"), row("b\0y", "b\0y"), row("b\0z", "b\0z")]);
    let backward = kv.scan(Table::Devices, &prefix, Direction::Backward, 2).await.unwrap();
    assert_eq!(backward, vec![row("b\0z", "b\0z"), row("b\0y", "b\0y")]);
    let between = kv.scan(Table::Devices, &KeyRange::between(b"a", b"b\0y"), Direction::Forward, 10).await.unwrap();
    assert_eq!(between, vec![row("a", "a"), row("b\0x", "b\0x")]);
    let inverted = kv.scan(Table::Devices, &KeyRange::between(b"c", b"a"), Direction::Forward, 10).await.unwrap();
    assert!(inverted.is_empty());
    let all = kv.scan(Table::Devices, &KeyRange::all(), Direction::Backward, 10).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0], row("c", "c"));
    let too_many = kv.scan(Table::Devices, &KeyRange::all(), Direction::Forward, crate::MAX_SCAN_ROWS + 1).await;
    assert!(matches!(too_many, Err(StorageError::LimitExceeded { .. })));
}

async fn a_failed_condition_writes_nothing(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    put(kv, Table::Counters, "n", "1").await;
    let mut batch = WriteBatch::new();
    batch.put(Table::Users, b"x".to_vec(), b"written".to_vec());
    batch.delete(Table::Counters, b"n".to_vec());
    batch.expect(Table::Counters, b"n".to_vec(), Some(b"2".to_vec()));
    assert!(matches!(kv.write(batch).await, Err(StorageError::Conflict)));
    assert_eq!(kv.get(Table::Users, b"x").await.unwrap(), None);
    assert_eq!(kv.get(Table::Counters, b"n").await.unwrap(), Some(b"1".to_vec()));

    let mut batch = WriteBatch::new();
    batch.put(Table::Users, b"x".to_vec(), b"written".to_vec());
    batch.put(Table::Counters, b"n".to_vec(), b"2".to_vec());
    batch.expect(Table::Counters, b"n".to_vec(), Some(b"1".to_vec()));
    batch.expect(Table::Users, b"x".to_vec(), None);
    kv.write(batch).await.unwrap();
    assert_eq!(kv.get(Table::Users, b"x").await.unwrap(), Some(b"written".to_vec()));
    assert_eq!(kv.get(Table::Counters, b"n").await.unwrap(), Some(b"2".to_vec()));
}

/// Writers race compare-and-set increments of one key, each success also claiming the value it
/// moved from. Batches written together in one group must see each other's writes: if two that
/// expect the same value both passed, a value would be claimed twice and the count would lag.
async fn racing_conditions_never_both_pass(kv: Arc<dyn KvStore>) {
    let mut tasks = Vec::new();
    for writer in 0..16u32 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = 0u64;
            for attempt in 0..20u32 {
                let current = kv.get(Table::Counters, b"cas").await.unwrap();
                let value = current.as_deref().map_or(0, |raw| u64::from_be_bytes(raw.try_into().unwrap()));
                let mut batch = WriteBatch::new();
                batch.expect(Table::Counters, b"cas".to_vec(), current);
                batch.put(Table::Counters, b"cas".to_vec(), (value + 1).to_be_bytes().to_vec());
                batch.put(Table::Users, value.to_be_bytes().to_vec(), format!("{writer}/{attempt}").into_bytes());
                match kv.write(batch).await {
                    Ok(()) => won += 1,
                    Err(StorageError::Conflict) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            won
        }));
    }
    let mut won = 0;
    for task in tasks {
        won += task.await.unwrap();
    }
    let last = kv.get(Table::Counters, b"cas").await.unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(last.try_into().unwrap()), won, "every success moved the counter once");
    let claimed = kv.scan(Table::Users, &KeyRange::all(), Direction::Forward, 1_000).await.unwrap();
    assert_eq!(claimed.len() as u64, won, "every value was claimed by exactly one writer");
}

async fn snapshots_do_not_see_later_writes(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    put(kv, Table::Profiles, "p", "old").await;
    let snapshot = kv.snapshot().await.unwrap();
    put(kv, Table::Profiles, "p", "new").await;
    put(kv, Table::Profiles, "q", "new").await;
    assert_eq!(snapshot.get(Table::Profiles, b"p").await.unwrap(), Some(b"old".to_vec()));
    let rows = snapshot.scan(Table::Profiles, &KeyRange::all(), Direction::Forward, 10).await.unwrap();
    assert_eq!(rows, vec![row("p", "old")]);
    assert_eq!(kv.get(Table::Profiles, b"p").await.unwrap(), Some(b"new".to_vec()));
}

async fn concurrent_counters_never_repeat(kv: Arc<dyn KvStore>) {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..25 {
                got.push(crate::next_counter(kv.as_ref(), "ids").await.unwrap());
            }
            got
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<u64>>());
}

async fn schema_is_stamped_and_checked(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    let chunk = crate::DEFAULT_MIGRATION_CHUNK_ROWS;
    assert_eq!(crate::open_schema(kv, &[], chunk).await.unwrap(), None);
    assert_eq!(crate::open_schema(kv, &[], chunk).await.unwrap(), Some(crate::SCHEMA_VERSION));
    let newer = crate::migrate_with(kv, crate::SCHEMA_VERSION - 1, &[], chunk).await;
    assert!(matches!(newer, Err(StorageError::SchemaTooNew { .. })));

    let mut batch = WriteBatch::new();
    batch.put(Table::AuthChains, b"$state".to_vec(), b"[]".to_vec());
    kv.write(batch).await.unwrap();
    let drop = crate::MigrationStep::drop_table("drop", Table::AuthChains, &[Table::AuthChains]);
    let migrations = [crate::Migration { from: crate::SCHEMA_VERSION, describe: "test", steps: vec![drop] }];
    let found = crate::migrate_with(kv, crate::SCHEMA_VERSION + 1, &migrations, chunk).await.unwrap();
    assert_eq!(found, Some(crate::SCHEMA_VERSION));
    assert_eq!(kv.get(Table::AuthChains, b"$state").await.unwrap(), None);
    // A gap with no migration is an error, not a silent skip.
    assert!(crate::migrate_with(kv, crate::SCHEMA_VERSION + 3, &migrations, chunk).await.is_err());
}

async fn counters_recover_past_every_value_they_may_have_handed_out(kv: Arc<dyn KvStore>) {
    let kv = kv.as_ref();
    let block = crate::COUNTER_RESERVATION_BLOCK;
    for expected in 1..=3 {
        assert_eq!(crate::next_counter(kv, "stream").await.unwrap(), expected);
    }
    assert_eq!(crate::next_counter(kv, "filter\0@a:hs").await.unwrap(), 1);
    let reserved = |name: &str| {
        let key = crate::keys::counter_reservation(name);
        async move { u64::from_be_bytes(kv.get(Table::Counters, &key).await.unwrap().unwrap().try_into().unwrap()) }
    };
    assert_eq!(reserved("stream").await, 1 + block, "reserved a block ahead of the first value");
    // A power loss drops the unsynced writes that took 2 and 3, which clients have seen.
    let mut lost = WriteBatch::new();
    lost.put(Table::Counters, crate::keys::counter("stream"), 1u64.to_be_bytes().to_vec());
    kv.write(lost).await.unwrap();

    assert_eq!(crate::recover_counters(kv).await.unwrap(), 2);
    assert_eq!(crate::counter(kv, "stream").await.unwrap(), 1 + block);
    assert_eq!(crate::counter(kv, "filter\0@a:hs").await.unwrap(), 1 + block);
    let next = crate::next_counter(kv, "stream").await.unwrap();
    assert_eq!(next, 2 + block, "never 2 or 3 again");
    assert_eq!(reserved("stream").await, next + block);
    // Nothing to move when every counter is at its reservation.
    let mut at_mark = WriteBatch::new();
    at_mark.put(Table::Counters, crate::keys::counter("stream"), (next + block).to_be_bytes().to_vec());
    kv.write(at_mark).await.unwrap();
    assert_eq!(crate::recover_counters(kv).await.unwrap(), 0);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                let kv: std::sync::Arc<dyn super::KvStore> = std::sync::Arc::new(crate::MemoryStore::new());
                super::$name(kv).await;
            })*
        }
        mod rocks {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let kv: std::sync::Arc<dyn super::KvStore> = std::sync::Arc::new(
                    super::RocksStore::open(dir.path(), &super::RocksOptions::default()).unwrap(),
                );
                super::$name(kv).await;
            })*
        }
    };
}

suite!(
    get_put_delete,
    scans_in_both_directions,
    a_failed_condition_writes_nothing,
    racing_conditions_never_both_pass,
    snapshots_do_not_see_later_writes,
    concurrent_counters_never_repeat,
    schema_is_stamped_and_checked,
    counters_recover_past_every_value_they_may_have_handed_out,
);

#[tokio::test]
async fn rocksdb_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let kv = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        put(&kv, Table::Users, "@a:hs", "kept").await;
    }
    let kv = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
    assert_eq!(kv.get(Table::Users, b"@a:hs").await.unwrap(), Some(b"kept".to_vec()));
}

#[tokio::test]
async fn counters_keep_increasing_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let kv = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
        crate::recover_counters(&kv).await.unwrap();
        let reserved = kv.get(Table::Counters, &crate::keys::counter_reservation("stream")).await.unwrap();
        let reserved = reserved.map_or(0, |raw| u64::from_be_bytes(raw.try_into().unwrap()));
        let first = crate::next_counter(&kv, "stream").await.unwrap();
        assert!(first > last && first > reserved, "{first} after {last}, reservation {reserved}");
        for _ in 0..5 {
            last = crate::next_counter(&kv, "stream").await.unwrap();
        }
    }
}

#[tokio::test]
async fn rocksdb_signals_closed_once_the_last_handle_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let kv = RocksStore::open(dir.path(), &RocksOptions::default()).unwrap();
    let closed = kv.closed();
    let snapshot = kv.snapshot().await.unwrap();
    drop(kv);
    // The snapshot still holds the database open, so its directory stays locked.
    assert!(RocksStore::open(dir.path(), &RocksOptions::default()).is_err());
    drop(snapshot);
    closed.wait().await;
    RocksStore::open(dir.path(), &RocksOptions::default()).expect("the closed database opens again");
}
