//! Schema migrations on a store written by the previous release (schema 1, commit 69341fa):
//! `tests/fixtures/schema1-store.tar.gz`, made by `scripts/make-migration-fixture.py`.
//! A migration killed with SIGKILL midway resumes and ends byte-identical to an uninterrupted
//! one; indexes that older stores lack are rebuilt to exactly what live ingest writes; and the
//! migrated server serves the old rooms.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lattice::Config;
use lattice_storage::records::{EventRecord, RoomRecord};
use lattice_storage::{KeyRange, KvStore, RocksOptions, RocksStore, Table, WriteBatch};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{Http, binary, process_env, test_config};

const FIXTURE_PASSWORD: &str = "fixture-password";

/// Unpacks the schema-1 fixture into `parent`; returns its data directory.
fn unpack_fixture(parent: &Path) -> PathBuf {
    let archive = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema1-store.tar.gz");
    let status =
        std::process::Command::new("tar").arg("xzf").arg(&archive).arg("-C").arg(parent).status().expect("run tar");
    assert!(status.success(), "unpacking {}", archive.display());
    parent.join("data")
}

fn config_for(data_dir: &Path, chunk_rows: usize) -> Config {
    let mut config = test_config(data_dir, "hs1.localhost");
    config.storage.migration_chunk_rows = chunk_rows;
    config
}

/// Opens the directory with this build (migrating it), then closes it again.
async fn open_and_close(config: &Config) {
    let opened = lattice::open(config).await.expect("open and migrate");
    assert!(!opened.fresh);
    drop(opened.service);
    opened.closed.wait().await;
}

/// Runs `f` on the raw store of a stopped server's data directory.
async fn with_store<T>(data_dir: &Path, f: impl AsyncFnOnce(&dyn KvStore) -> T) -> T {
    let store = RocksStore::open(&data_dir.join("db"), &RocksOptions::default()).expect("open store");
    let closed = store.closed();
    let result = f(&store).await;
    drop(store);
    closed.wait().await;
    result
}

type Dump = Vec<(&'static str, Vec<(Vec<u8>, Vec<u8>)>)>;

async fn dump(data_dir: &Path) -> Dump {
    with_store(data_dir, async |kv| {
        let mut tables = Vec::new();
        for table in Table::ALL {
            let rows = lattice_storage::scan_all(kv, *table, &KeyRange::all()).await.expect("scan");
            tables.push((table.name(), rows));
        }
        tables
    })
    .await
}

fn rows(dump: &Dump, table: Table) -> &[(Vec<u8>, Vec<u8>)] {
    &dump.iter().find(|(name, _)| *name == table.name()).expect("table dumped").1
}

/// Rows written at a server's first start from the clock, not by a migration: two copies of one
/// store started at different moments differ in them by design.
fn is_start_time_row(table: &str, key: &[u8]) -> bool {
    table == Table::Media.name() && key == b"\0legacy_cutoff"
}

fn assert_same_dump(left: &Dump, right: &Dump) {
    for ((name, left_rows), (_, right_rows)) in left.iter().zip(right) {
        let left_rows: Vec<_> = left_rows.iter().filter(|(key, _)| !is_start_time_row(name, key)).collect();
        let right_rows: Vec<_> = right_rows.iter().filter(|(key, _)| !is_start_time_row(name, key)).collect();
        assert_eq!(left_rows.len(), right_rows.len(), "row count of table {name}");
        for (l, r) in left_rows.into_iter().zip(right_rows) {
            assert_eq!(l, r, "table {name}: {} / {}", String::from_utf8_lossy(&l.0), String::from_utf8_lossy(&r.0));
        }
    }
}

async fn stored_schema(kv: &dyn KvStore) -> (u32, bool) {
    let version = kv.get(Table::Meta, b"schema_version").await.unwrap().expect("version");
    let version = u32::from_be_bytes(version.try_into().unwrap());
    let in_progress = kv.get(Table::Meta, b"migration_progress").await.unwrap().is_some();
    (version, in_progress)
}

/// Starts the binary on the directory with one-row chunks and progress logged per chunk, and
/// kills it with SIGKILL once it logged its first chunk. The test then stops reading its log:
/// once the pipe is full the migration blocks on its next line, so it cannot finish first.
async fn kill_after_first_chunk(data_dir: &Path) {
    let mut child = Command::new(binary())
        .arg("serve")
        .envs(process_env(data_dir, "127.0.0.1:0".parse().unwrap()))
        .env("LATTICE_STORAGE__MIGRATION_CHUNK_ROWS", "1")
        .env("LATTICE_LOGGING__LEVEL", "info,lattice_storage=debug")
        .env_remove("RUST_LOG")
        .env_remove("LATTICE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lattice");
    let mut log = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let wait_for_progress = async {
        while let Some(line) = log.next_line().await.expect("read log") {
            if line.contains("migration progress") {
                return;
            }
        }
        panic!("the binary exited before it logged migration progress");
    };
    tokio::time::timeout(Duration::from_secs(120), wait_for_progress).await.expect("a progress line");
    child.kill().await.expect("SIGKILL");
    drop(log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_killed_midway_resumes_and_ends_identical_to_an_uninterrupted_one() {
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = unpack_fixture(fresh_dir.path());
    assert_eq!(with_store(&fresh, async |kv| stored_schema(kv).await).await, (1, false), "a schema-1 fixture");
    open_and_close(&config_for(&fresh, 1)).await;
    let expected = dump(&fresh).await;

    let killed_dir = tempfile::tempdir().unwrap();
    let killed = unpack_fixture(killed_dir.path());
    kill_after_first_chunk(&killed).await;
    assert_eq!(
        with_store(&killed, async |kv| stored_schema(kv).await).await,
        (1, true),
        "killed midway: still schema 1, with a migration under way"
    );
    open_and_close(&config_for(&killed, 1)).await;
    let resumed = dump(&killed).await;
    assert_same_dump(&resumed, &expected);

    let meta = rows(&resumed, Table::Meta);
    let current = lattice_storage::SCHEMA_VERSION.to_be_bytes().to_vec();
    assert!(meta.contains(&(b"schema_version".to_vec(), current)), "{meta:?}");
    assert!(!meta.iter().any(|(key, _)| key == b"migration_progress"));
    assert!(rows(&resumed, Table::AuthChains).is_empty());
    let account_data = rows(&resumed, Table::AccountDataPositions).len();
    assert!(account_data > 0, "the fixture has account data");
    assert_eq!(rows(&resumed, Table::AccountDataChanges).len(), account_data, "one change row per entry");
    let activity = rows(&resumed, Table::Timeline).len() + rows(&resumed, Table::ReceiptPositions).len();
    assert_eq!(rows(&resumed, Table::RoomActivity).len(), activity, "one activity row per event and receipt");
    let timeline = rows(&resumed, Table::Timeline).len();
    assert_eq!(rows(&resumed, Table::Topological).len(), timeline, "one topological row per timeline event");
    let rooms = rows(&resumed, Table::Rooms);
    assert_eq!(rooms.len(), 3);
    for (_, raw) in rooms {
        let room: RoomRecord = serde_json::from_slice(raw).unwrap();
        assert_eq!(room.forward_extremities.len(), 1, "one extremity per room (no forks)");
        assert_eq!(room.extremity_groups.as_ref().map(Vec::len), Some(1), "the front's state groups counted");
    }
}

/// Removes what stores older than each index lack: relation, thread, timestamp and
/// receipt-position rows, `redacted_by` and member counts.
async fn strip_later_indexes(data_dir: &Path) {
    with_store(data_dir, async |kv| {
        let mut batch = WriteBatch::new();
        let tables =
            [Table::Relations, Table::Threads, Table::ThreadActivity, Table::EventTimestamps, Table::ReceiptPositions];
        for table in tables {
            for (key, _) in lattice_storage::scan_all(kv, table, &KeyRange::all()).await.unwrap() {
                batch.delete(table, key);
            }
        }
        for (key, raw) in lattice_storage::scan_all(kv, Table::Events, &KeyRange::all()).await.unwrap() {
            let mut event: EventRecord = serde_json::from_slice(&raw).unwrap();
            if event.redacted_by.take().is_some() {
                batch.put(Table::Events, key, serde_json::to_vec(&event).unwrap());
            }
        }
        for (key, raw) in lattice_storage::scan_all(kv, Table::Rooms, &KeyRange::all()).await.unwrap() {
            let mut room: RoomRecord = serde_json::from_slice(&raw).unwrap();
            room.member_counts = None;
            batch.put(Table::Rooms, key, serde_json::to_vec(&room).unwrap());
        }
        assert!(batch.ops.len() > 20, "the fixture has indexes to strip: {}", batch.ops.len());
        kv.write(batch).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_missing_from_older_stores_are_rebuilt_to_what_live_ingest_wrote() {
    let with_dir = tempfile::tempdir().unwrap();
    let with_indexes = unpack_fixture(with_dir.path());
    open_and_close(&config_for(&with_indexes, 7)).await;

    let without_dir = tempfile::tempdir().unwrap();
    let without_indexes = unpack_fixture(without_dir.path());
    strip_later_indexes(&without_indexes).await;
    open_and_close(&config_for(&without_indexes, 7)).await;

    assert_same_dump(&dump(&without_indexes).await, &dump(&with_indexes).await);
}

async fn login(http: &Http, user: &str) -> String {
    let (status, body) = http.login(user, FIXTURE_PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

async fn get_ok(http: &Http, token: &str, path: &str) -> Value {
    let (status, body) = http.get(path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The fixture's main room: the one named "the main room".
async fn main_room(http: &Http, token: &str) -> String {
    let joined = get_ok(http, token, "/_matrix/client/v3/joined_rooms").await;
    for room in joined["joined_rooms"].as_array().unwrap() {
        let room = room.as_str().unwrap();
        let (status, name) =
            http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), Some(token)).await;
        if status == 200 && name["name"] == "the main room" {
            return room.to_owned();
        }
    }
    panic!("no main room in {joined}");
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or("(redacted)").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migrated_server_serves_the_old_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let data = unpack_fixture(dir.path());
    // As stored by a release before these indexes: only the migration can bring them back.
    strip_later_indexes(&data).await;
    let running = lattice::start(config_for(&data, 5)).await.expect("migrates and serves");
    let http = Http::new(format!("http://{}", running.address));
    let alice = login(&http, "alice").await;
    let bob = login(&http, "bob").await;
    let room = main_room(&http, &alice).await;

    // History, newest first, in pages.
    let mut history = Vec::new();
    let mut from = String::new();
    loop {
        let page =
            get_ok(&http, &alice, &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=7{from}")).await;
        history.extend(page["chunk"].as_array().unwrap().iter().cloned());
        match page["end"].as_str() {
            Some(end) => from = format!("&from={end}"),
            None => break,
        }
    }
    assert_eq!(history.last().unwrap()["type"], "m.room.create", "history reaches the create event");
    // The message-search index, built by the migration to schema 4.
    let search = json!({ "search_categories": { "room_events": {
        "search_term": "message", "order_by": "recent", "filter": { "rooms": [room] },
    } } });
    let (status, found) = http.post("/_matrix/client/v3/search", Some(&alice), &search).await;
    assert_eq!(status, 200, "{found}");
    let results = found["search_categories"]["room_events"]["results"].as_array().expect("results");
    assert!(!results.is_empty(), "the migrated messages are found: {found}");
    let plain: Vec<String> = bodies(&history).into_iter().filter(|b| b.starts_with("message ")).rev().collect();
    let mut expected: Vec<String> = (0..30).map(|i| format!("message {i}")).collect();
    expected.remove(5); // redacted
    assert_eq!(plain, expected);
    let message = |i: usize| -> &Value {
        history.iter().find(|e| e["content"]["body"] == format!("message {i}")).expect("message in history")
    };
    let redacted = history
        .iter()
        .find(|e| e["type"] == "m.room.message" && e["content"].as_object().is_some_and(|c| c.is_empty()))
        .expect("the redacted message");
    assert_eq!(redacted["unsigned"]["redacted_because"]["content"]["reason"], "spam", "{redacted}");
    // Bundled aggregations: the edit and the thread.
    assert_eq!(
        message(0)["unsigned"]["m.relations"]["m.replace"]["content"]["m.new_content"]["body"],
        "message 0 (edited)"
    );
    assert_eq!(message(1)["unsigned"]["m.relations"]["m.thread"]["count"], 2);

    // Relations.
    let relations = |parent: &Value, rel: &str| {
        let path = format!("/_matrix/client/v1/rooms/{room}/relations/{}{rel}", parent["event_id"].as_str().unwrap());
        let (http, bob) = (http.clone(), bob.clone());
        async move { get_ok(&http, &bob, &path).await["chunk"].as_array().unwrap().clone() }
    };
    let replies = relations(message(1), "/m.thread").await;
    assert_eq!(bodies(&replies), ["thread reply 1", "thread reply 0"], "newest first");
    let reactions = relations(message(2), "/m.annotation").await;
    assert_eq!(reactions.len(), 1);
    assert_eq!(reactions[0]["content"]["m.relates_to"]["key"], "👍");
    assert!(relations(message(4), "").await.is_empty(), "the redacted reaction is not a relation");
    assert_eq!(relations(message(3), "/m.reference").await.len(), 1);
    let threads = get_ok(&http, &bob, &format!("/_matrix/client/v1/rooms/{room}/threads")).await;
    let roots: Vec<&Value> = threads["chunk"].as_array().unwrap().iter().map(|e| &e["event_id"]).collect();
    assert_eq!(roots, [&message(1)["event_id"]], "{threads}");
    let thread = &threads["chunk"][0]["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["latest_event"]["content"]["body"], "thread reply 1", "{thread}");
    assert_eq!(thread["current_user_participated"], true, "bob replied: {thread}");

    // Receipts in /sync (read through the receipt-position index).
    let synced = get_ok(&http, &bob, "/_matrix/client/v3/sync").await;
    let ephemeral = synced["rooms"]["join"][&room]["ephemeral"]["events"].as_array().unwrap().clone();
    let receipts = ephemeral.iter().find(|e| e["type"] == "m.receipt").expect("receipts");
    let alice_id = "@alice:hs1.localhost";
    let read_29 = &receipts["content"][message(29)["event_id"].as_str().unwrap()];
    assert!(read_29["m.read"][alice_id].is_object(), "{receipts}");
    let read_25 = &receipts["content"][message(25)["event_id"].as_str().unwrap()];
    assert!(read_25["m.read"]["@bob:hs1.localhost"].is_object(), "{receipts}");
    let private = &receipts["content"][message(26)["event_id"].as_str().unwrap()];
    assert!(private["m.read.private"]["@bob:hs1.localhost"].is_object(), "bob sees his private receipt: {receipts}");
    let summary = &synced["rooms"]["join"][&room]["summary"];
    assert_eq!(summary["m.joined_member_count"], 2, "{summary}");
    assert_eq!(summary["m.invited_member_count"], 1, "{summary}");

    // Tags and account data came through untouched.
    let tags = get_ok(&http, &alice, &format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags")).await;
    assert_eq!(tags, json!({ "tags": { "m.favourite": { "order": 0.25 } } }));
    let settings =
        get_ok(&http, &alice, &format!("/_matrix/client/v3/user/{alice_id}/account_data/org.example.settings")).await;
    assert_eq!(settings, json!({ "theme": "dark" }));

    // timestamp_to_event, from the rebuilt timestamp index.
    let ts = message(10)["origin_server_ts"].as_u64().unwrap();
    let found =
        get_ok(&http, &alice, &format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={ts}&dir=f")).await;
    assert_eq!(found["origin_server_ts"], ts, "{found}");
    running.stop().await.unwrap();
}
