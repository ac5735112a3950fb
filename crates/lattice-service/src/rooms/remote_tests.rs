//! The room model with events from another server, before any network exists: a second
//! `Service` named `remote.test` builds and signs events as a remote homeserver does, and this
//! server receives them as bytes through the one ingest path. Out-of-order arrival, gaps filled
//! by backfill, outliers, a partition healed by state resolution, refused foreign references,
//! soft failure, and a wide front merged back.

use std::sync::Arc;

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_core::state_resolution::StateMap;
use lattice_storage::records::{EventRecord, RoomRecord};
use lattice_storage::{Direction, KeyRange, KvRead, KvStore, MemoryStore, Table, keys};
use ruma::signatures::PublicKeyMap;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::json;

use super::{Arrival, CreateRoom, Outcome};
use crate::sync::SyncRequest;
use crate::{Service, ServiceError};

struct Server {
    service: Service,
    kv: Arc<MemoryStore>,
}

fn server(name: &str) -> Server {
    let (service, kv) = super::tests::service_named(name);
    Server { service, kv }
}

/// Both servers' public keys, as federation would have fetched them.
fn keys_of(servers: &[&Server]) -> PublicKeyMap {
    let mut keys = PublicKeyMap::new();
    for server in servers {
        let key = &server.service.rooms().signing_key;
        keys.insert(
            server.service.server_name().to_string(),
            [(format!("ed25519:{}", key.version()), ruma::serde::Base64::new(key.public_key().to_vec()))].into(),
        );
    }
    keys
}

/// Two servers sharing one room created on `hs.test` by alice (power 100), joined by rita of
/// `remote.test` (given power 50); every event so far relayed to the remote server.
struct Shared {
    local: Server,
    remote: Server,
    keys: PublicKeyMap,
    room: OwnedRoomId,
    version: RoomVersion,
    alice: OwnedUserId,
    rita: OwnedUserId,
}

async fn shared_room() -> Shared {
    let (local, remote) = (server("hs.test"), server("remote.test"));
    let keys = keys_of(&[&local, &remote]);
    let alice = UserId::parse("@alice:hs.test").unwrap();
    let rita = UserId::parse("@rita:remote.test").unwrap();
    let request = CreateRoom {
        preset: Some(super::Preset::PublicChat),
        power_level_content_override: Some(
            serde_json::from_value(json!({ "users": { alice.as_str(): 100, rita.as_str(): 50 } })).unwrap(),
        ),
        ..Default::default()
    };
    let room = local.service.rooms().create_room(&alice, request).await.unwrap();
    let version = local.service.rooms().room_version(&room).await.unwrap();
    let shared = Shared { local, remote, keys, room, version, alice, rita };
    for id in timeline(&shared.local, &shared.room).await {
        relay(&shared, &shared.local, &shared.remote, &id).await;
    }
    let join = shared.remote.service.rooms().join_room(&shared.rita, &shared.room, None).await.unwrap();
    relay(&shared, &shared.remote, &shared.local, &join).await;
    shared
}

/// The stored JSON of an event.
async fn json_of(server: &Server, id: &OwnedEventId) -> CanonicalJsonObject {
    let record =
        lattice_storage::get::<EventRecord>(server.kv.as_ref(), &keys::event(id.as_str())).await.unwrap().unwrap();
    serde_json::from_str(&record.value.json).unwrap()
}

async fn record_of(server: &Server, id: &OwnedEventId) -> Option<EventRecord> {
    lattice_storage::get::<EventRecord>(server.kv.as_ref(), &keys::event(id.as_str())).await.unwrap().map(|r| r.value)
}

/// Sends an event from one server to the other, live, as a `/send` transaction would.
async fn relay(shared: &Shared, from: &Server, to: &Server, id: &OwnedEventId) -> Outcome {
    let bytes = serde_json::to_vec(&json_of(from, id).await).unwrap();
    let ingested =
        to.service.rooms().receive_pdu(from.service.server_name(), &shared.version, &bytes, &shared.keys).await;
    ingested.unwrap().outcome
}

/// The event as the receiving server checks it, for placing it another way.
async fn checked(shared: &Shared, from: &Server, id: &OwnedEventId) -> Pdu {
    let bytes = serde_json::to_vec(&json_of(from, id).await).unwrap();
    shared
        .local
        .service
        .rooms()
        .check_remote_pdu(from.service.server_name(), &shared.version, &bytes, &shared.keys)
        .unwrap()
}

/// Event IDs of a table's rows under the room's prefix, in key order.
async fn room_rows(server: &Server, table: Table, room: &RoomId) -> Vec<String> {
    let prefix = keys::room_rows(room.as_str());
    let rows = server.kv.scan(table, &KeyRange::prefix(&prefix), Direction::Forward, 10_000).await.unwrap();
    rows.into_iter()
        .map(|(key, value)| match value.is_empty() {
            true => String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
            false => String::from_utf8(value).unwrap(),
        })
        .collect()
}

async fn timeline(server: &Server, room: &RoomId) -> Vec<OwnedEventId> {
    room_rows(server, Table::Timeline, room).await.into_iter().map(|id| OwnedEventId::try_from(id).unwrap()).collect()
}

async fn room_record(server: &Server, room: &RoomId) -> RoomRecord {
    lattice_storage::get::<RoomRecord>(server.kv.as_ref(), &keys::room(room.as_str())).await.unwrap().unwrap().value
}

async fn current(server: &Server, room: &RoomId, kind: &str, key: &str) -> Option<String> {
    let raw = server.kv.get(Table::CurrentState, &keys::current_state(room.as_str(), kind, key)).await.unwrap();
    raw.map(|bytes| String::from_utf8(bytes).unwrap())
}

async fn say(server: &Server, room: &RoomId, sender: &UserId, body: &str) -> OwnedEventId {
    server
        .service
        .rooms()
        .send_event(sender, room, "m.room.message", None, json!({ "msgtype": "m.text", "body": body }), None)
        .await
        .unwrap()
}

/// The full current state of the room on `server`, as event IDs.
async fn state_ids(server: &Server, room: &RoomId) -> StateMap {
    let group = room_record(server, room).await.current_state_group;
    super::state_store::load(server.kv.as_ref(), group).await.unwrap()
}

/// Bodies of the timeline of an incremental sync since `since`.
async fn synced_bodies(server: &Server, user: &UserId, room: &RoomId, since: u64) -> Vec<String> {
    let request = SyncRequest {
        since: Some(crate::sync::SyncToken { streams: crate::sync::StreamSet { events: since, ..Default::default() } }),
        timeout: std::time::Duration::ZERO,
        device_id: None,
        filter: Default::default(),
        full_state: false,
        set_presence: crate::presence::PresenceState::Online,
    };
    let response = server.service.sync().sync(user, request).await.unwrap();
    let events = &response["rooms"]["join"][room.as_str()]["timeline"]["events"];
    events
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Re-signs `object` as `server` after `change`, as a hostile or buggy server could.
fn forged(
    server: &Server,
    version: &RoomVersion,
    mut object: CanonicalJsonObject,
    change: impl FnOnce(&mut CanonicalJsonObject),
) -> Vec<u8> {
    object.remove("signatures");
    object.remove("hashes");
    object.remove("unsigned");
    change(&mut object);
    lattice_core::pdu::hash_and_sign(
        &mut object,
        server.service.server_name().as_str(),
        &server.service.rooms().signing_key,
        version,
    )
    .unwrap();
    serde_json::to_vec(&object).unwrap()
}

fn ids(values: &[&str]) -> CanonicalJsonValue {
    CanonicalJsonValue::Array(values.iter().map(|id| CanonicalJsonValue::String((*id).to_owned())).collect())
}

/// Messages arriving after their successor: the later one is accepted with the state the
/// remote server gives for it and the gap is recorded; backfill fills the gap in history order,
/// and `/sync` never shows the backfilled messages as new.
#[tokio::test]
async fn a_gap_is_recorded_then_filled_by_backfill_without_reaching_sync() {
    let s = shared_room().await;
    let mut missed = Vec::new();
    for n in 1..=4 {
        missed.push(say(&s.remote, &s.room, &s.rita, &format!("missed {n}")).await);
    }
    let last = say(&s.remote, &s.room, &s.rita, "last").await;
    let since = room_record(&s.local, &s.room).await.last_stream_position;
    let old_front = room_record(&s.local, &s.room).await.forward_extremities;

    // Without the state before it, an event after a gap is refused with the missing IDs.
    let error = s.local.service.rooms().ingest(&s.version, checked(&s, &s.remote, &last).await).await.unwrap_err();
    assert!(matches!(&error, ServiceError::MissingEvents(ids) if ids.contains(missed[3].as_str())), "{error:?}");

    // With it (as `/state_ids` answers), it is accepted live and the gap is recorded.
    let state = state_ids(&s.remote, &s.room).await;
    let ingested = s
        .local
        .service
        .rooms()
        .ingest_placed(&s.version, checked(&s, &s.remote, &last).await, Arrival::Live, Some(&state))
        .await
        .unwrap();
    assert_eq!(ingested.outcome, Outcome::Accepted);
    assert_eq!(room_rows(&s.local, Table::BackwardExtremities, &s.room).await, [missed[3].to_string()]);
    // This server cannot know yet that the missed messages descend from its old front, so both
    // are extremities until the next local event cites them.
    let mut front = old_front.clone();
    front.push(last.to_string());
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities, front);

    // Backfill, oldest first: each is placed in history, none in the sync timeline.
    for id in &missed {
        let ingested = s
            .local
            .service
            .rooms()
            .ingest_placed(&s.version, checked(&s, &s.remote, id).await, Arrival::Backfill, None)
            .await
            .unwrap();
        assert_eq!(ingested.outcome, Outcome::Accepted, "{id}");
        assert_eq!(ingested.stream_position, None, "{id}: backfill has no stream position");
        assert!(record_of(&s.local, id).await.unwrap().order.is_some(), "{id}: placed in history");
    }
    assert!(room_rows(&s.local, Table::BackwardExtremities, &s.room).await.is_empty(), "the gap is filled");
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities, front, "the front stays");
    assert!(
        !timeline(&s.local, &s.room).await.iter().any(|id| missed.contains(id)),
        "no backfilled event in /sync's log"
    );
    assert_eq!(synced_bodies(&s.local, &s.alice, &s.room, since).await, ["last"], "sync shows the live event only");

    // History order is the graph's: the missed messages before the last one.
    let history = room_rows(&s.local, Table::Topological, &s.room).await;
    let tail: Vec<&String> = history.iter().rev().take(5).collect();
    let expected: Vec<String> =
        std::iter::once(last.to_string()).chain(missed.iter().rev().map(|id| id.to_string())).collect();
    assert_eq!(tail, expected.iter().collect::<Vec<_>>());
}

/// An outlier is stored without state, shown nowhere, and placed when it arrives again.
#[tokio::test]
async fn an_outlier_is_stored_apart_until_it_is_placed() {
    let s = shared_room().await;
    let topic = s
        .remote
        .service
        .rooms()
        .send_event(&s.rita, &s.room, "m.room.topic", Some(""), json!({ "topic": "from afar" }), None)
        .await
        .unwrap();
    let before = room_record(&s.local, &s.room).await;

    let outlier =
        s.local.service.rooms().ingest_outlier(&s.version, checked(&s, &s.remote, &topic).await).await.unwrap();
    assert_eq!(outlier.outcome, Outcome::Outlier);
    assert_eq!(outlier.stream_position, None);
    assert_eq!(room_record(&s.local, &s.room).await, before, "the room's front and state are untouched");
    assert_ne!(current(&s.local, &s.room, "m.room.topic", "").await.as_deref(), Some(topic.as_str()));
    assert!(!timeline(&s.local, &s.room).await.contains(&topic));
    assert!(!room_rows(&s.local, Table::Topological, &s.room).await.contains(&topic.to_string()));
    let error = s.local.service.rooms().room_event(&s.alice, &s.room, topic.as_str()).await.unwrap_err();
    assert!(matches!(error, ServiceError::NotFound(_)), "an outlier is not served: {error:?}");

    // Received live, it becomes an ordinary event of the room.
    assert_eq!(relay(&s, &s.remote, &s.local, &topic).await, Outcome::Accepted);
    assert!(record_of(&s.local, &topic).await.unwrap().stream_position.is_some());
    assert_eq!(current(&s.local, &s.room, "m.room.topic", "").await.as_deref(), Some(topic.as_str()));
}

/// A partition: each side changes the topic; when the events cross, both servers resolve to
/// the same current state, and the next event merges the fork.
#[tokio::test]
async fn a_partition_heals_to_the_same_state_on_both_servers() {
    let s = shared_room().await;
    let local_topic = s
        .local
        .service
        .rooms()
        .send_event(&s.alice, &s.room, "m.room.topic", Some(""), json!({ "topic": "here" }), None)
        .await
        .unwrap();
    let remote_topic = s
        .remote
        .service
        .rooms()
        .send_event(&s.rita, &s.room, "m.room.topic", Some(""), json!({ "topic": "there" }), None)
        .await
        .unwrap();
    let local_talk = say(&s.local, &s.room, &s.alice, "while apart (here)").await;
    let remote_talk = say(&s.remote, &s.room, &s.rita, "while apart (there)").await;

    for id in [&remote_topic, &remote_talk] {
        assert_eq!(relay(&s, &s.remote, &s.local, id).await, Outcome::Accepted, "{id}");
    }
    for id in [&local_topic, &local_talk] {
        assert_eq!(relay(&s, &s.local, &s.remote, id).await, Outcome::Accepted, "{id}");
    }
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities.len(), 2, "a fork on each side");
    let topic_here = current(&s.local, &s.room, "m.room.topic", "").await;
    assert_eq!(topic_here, current(&s.remote, &s.room, "m.room.topic", "").await, "both servers resolve alike");
    // Topics are not power events: with one mainline, the later (by timestamp, then ID) wins.
    let key = |object: CanonicalJsonObject, id: &OwnedEventId| match &object["origin_server_ts"] {
        CanonicalJsonValue::Integer(ts) => (i64::from(*ts), id.to_string()),
        other => panic!("origin_server_ts {other:?}"),
    };
    let here = key(json_of(&s.local, &local_topic).await, &local_topic);
    let there = key(json_of(&s.remote, &remote_topic).await, &remote_topic);
    let later = if here > there { &local_topic } else { &remote_topic };
    assert_eq!(topic_here.as_deref(), Some(later.as_str()));

    let merge = say(&s.local, &s.room, &s.alice, "back together").await;
    let prevs = json_of(&s.local, &merge).await["prev_events"].clone();
    assert_eq!(prevs.as_array().map(|a| a.len()), Some(2), "the next event cites both branches");
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities, [merge.to_string()]);
}

/// Events naming prev or auth events of another room are refused and store nothing; so is an
/// event pushed by a server other than its sender's.
#[tokio::test]
async fn foreign_references_and_foreign_senders_are_refused() {
    let s = shared_room().await;
    let other = s.remote.service.rooms().create_room(&s.rita, CreateRoom::default()).await.unwrap();
    let other_event = timeline(&s.remote, &other).await.pop().unwrap();
    for id in timeline(&s.remote, &other).await {
        s.local.service.rooms().ingest_outlier(&s.version, checked(&s, &s.remote, &id).await).await.unwrap();
    }
    let message = say(&s.remote, &s.room, &s.rita, "hello").await;
    let template = json_of(&s.remote, &message).await;
    let mut auth_ids: Vec<String> = Vec::new();
    if let Some(CanonicalJsonValue::Array(auth)) = template.get("auth_events") {
        auth_ids = auth
            .iter()
            .filter_map(|v| match v {
                CanonicalJsonValue::String(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
    }
    let foreign_prev = forged(&s.remote, &s.version, template.clone(), |o| {
        o.insert("prev_events".into(), ids(&[other_event.as_str()]));
    });
    let foreign_auth = forged(&s.remote, &s.version, template.clone(), |o| {
        let mut auth: Vec<&str> = auth_ids.iter().map(String::as_str).collect();
        auth.push(other_event.as_str());
        o.insert("auth_events".into(), ids(&auth));
    });
    let before = s.local.kv.snapshot().await.unwrap();
    for (what, bytes) in [("prev", foreign_prev), ("auth", foreign_auth)] {
        let result =
            s.local.service.rooms().receive_pdu(s.remote.service.server_name(), &s.version, &bytes, &s.keys).await;
        assert!(
            matches!(result, Err(ServiceError::BadJson(ref m)) if m.contains("another room")),
            "{what}: {result:?}"
        );
    }
    let bytes = serde_json::to_vec(&template).unwrap();
    let spoofed =
        s.local.service.rooms().receive_pdu("evil.test".try_into().unwrap(), &s.version, &bytes, &s.keys).await;
    assert!(matches!(spoofed, Err(ServiceError::Forbidden(_))), "{spoofed:?}");
    for table in [Table::Events, Table::Timeline, Table::Rooms, Table::BackwardExtremities, Table::CurrentState] {
        let then = before.scan(table, &KeyRange::all(), Direction::Forward, 1000).await.unwrap();
        let now = s.local.kv.scan(table, &KeyRange::all(), Direction::Forward, 1000).await.unwrap();
        assert_eq!(then, now, "{table:?} untouched");
    }
}

/// Rita, banned here while her server did not know yet, keeps talking on the old branch: her
/// message is soft-failed — stored, in no timeline, not built on.
#[tokio::test]
async fn a_soft_failed_event_is_kept_out_of_state_timelines_and_the_front() {
    let s = shared_room().await;
    let ban = s
        .local
        .service
        .rooms()
        .send_event(&s.alice, &s.room, "m.room.member", Some(s.rita.as_str()), json!({ "membership": "ban" }), None)
        .await
        .unwrap();
    let late = s
        .remote
        .service
        .rooms()
        .send_event(&s.rita, &s.room, "m.room.name", Some(""), json!({ "name": "mine now" }), None)
        .await
        .unwrap();
    let before = room_record(&s.local, &s.room).await;

    assert!(matches!(relay(&s, &s.remote, &s.local, &late).await, Outcome::SoftFailed(_)));
    let record = record_of(&s.local, &late).await.unwrap();
    assert_eq!((record.stream_position, record.order), (None, None));
    assert_eq!(room_record(&s.local, &s.room).await, before, "front and current state untouched");
    assert_eq!(current(&s.local, &s.room, "m.room.name", "").await, None);
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities, [ban.to_string()]);
}

/// 2,000 remote messages that all cite one event make a front 2,000 wide: local sends keep
/// working, and the merge brings the front back to a handful.
#[tokio::test]
async fn a_front_of_two_thousand_extremities_is_merged_without_client_errors() {
    let s = shared_room().await;
    let base = say(&s.remote, &s.room, &s.rita, "base").await;
    assert_eq!(relay(&s, &s.remote, &s.local, &base).await, Outcome::Accepted);
    let template = json_of(&s.remote, &base).await;
    for n in 0..2_000 {
        let bytes = forged(&s.remote, &s.version, template.clone(), |o| {
            o.insert("prev_events".into(), ids(&[base.as_str()]));
            o.insert(
                "content".into(),
                CanonicalJsonValue::try_from(json!({ "msgtype": "m.text", "body": format!("sibling {n}") })).unwrap(),
            );
        });
        let ingested = s
            .local
            .service
            .rooms()
            .receive_pdu(s.remote.service.server_name(), &s.version, &bytes, &s.keys)
            .await
            .unwrap();
        assert_eq!(ingested.outcome, Outcome::Accepted);
    }
    assert_eq!(room_record(&s.local, &s.room).await.forward_extremities.len(), 2_000);

    let sent = say(&s.local, &s.room, &s.alice, "still here").await;
    assert!(record_of(&s.local, &sent).await.unwrap().stream_position.is_some());
    let merged = s.local.service.rooms().merge_wide_fronts().await;
    let width = room_record(&s.local, &s.room).await.forward_extremities.len();
    assert!(width <= super::front::MERGE_THRESHOLD, "front merged to {width} by {merged} events");
    assert!(merged > 50, "each merge event cites at most 20 extremities: {merged}");
    let after =
        s.local.service.rooms().send_event(&s.alice, &s.room, "m.room.message", None, json!({ "body": "after" }), None);
    assert!(after.await.is_ok());
}

/// A public room of alice's with `members` more local users joined and one message sent, so
/// the caches a later event uses (members, rulesets, pushers) are warm.
async fn warm_room_of_local_members(members: usize) -> (Server, OwnedRoomId, OwnedUserId) {
    let local = server("hs.test");
    let alice = UserId::parse("@alice:hs.test").unwrap();
    let request = CreateRoom { preset: Some(super::Preset::PublicChat), ..Default::default() };
    let room = local.service.rooms().create_room(&alice, request).await.unwrap();
    for n in 0..members {
        let user = UserId::parse(format!("@u{n}:hs.test")).unwrap();
        local.service.rooms().join_room(&user, &room, None).await.unwrap();
    }
    say(&local, &room, &alice, "warm up").await;
    (local, room, alice)
}

/// The ingest of a plain message reads no whole state, however big the room: its cost is
/// measured in rows read, which does not grow with the number of members, local ones included:
/// the room's members, their rulesets and their pushers are cached after the first message
/// (issue #12), so push rules read nothing per member.
#[tokio::test]
async fn a_message_costs_the_same_in_a_big_room_as_in_a_small_one() {
    async fn reads_for_one_message(members: usize) -> u64 {
        let (local, room, alice) = warm_room_of_local_members(members).await;
        let before = local.kv.rows_read();
        say(&local, &room, &alice, "measured").await;
        local.kv.rows_read() - before
    }
    // Member counts a multiple of the snapshot interval (64 state groups) apart, so both
    // messages sit at the same place in their state group's delta chain.
    // Both rooms are past their first snapshot, so the walk ends at a snapshot in both.
    let small = reads_for_one_message(2 + 64).await;
    let big = reads_for_one_message(2 + 5 * 64).await;
    assert_eq!(small, big, "rows read for one message: {small} with 67 members, {big} with 323");
}

/// A message into a big room of local members writes what it writes in a small one: members
/// with the default rules share one notification row instead of two rows each (issue #10: a
/// room of 10,000 members sends at the rate of a room of 3).
#[tokio::test]
async fn a_message_writes_the_same_rows_in_a_big_room_as_in_a_small_one() {
    async fn writes_for_one_message(members: usize) -> u64 {
        let (local, room, alice) = warm_room_of_local_members(members).await;
        let before = local.kv.rows_written();
        say(&local, &room, &alice, "measured").await;
        local.kv.rows_written() - before
    }
    let small = writes_for_one_message(2 + 64).await;
    let big = writes_for_one_message(2 + 5 * 64).await;
    assert_eq!(small, big, "rows written for one message: {small} with 67 members, {big} with 323");
}

/// A join into a big room of local members costs what it costs in a small one: push rules
/// bring the room's recipients forward by reading the joining member only, instead of every
/// member's event again (issue #12: 10,000 local members joining one room).
#[tokio::test]
async fn a_join_costs_the_same_in_a_big_room_as_in_a_small_one() {
    async fn reads_for_one_join(members: usize) -> u64 {
        let (local, room, _) = warm_room_of_local_members(members).await;
        let late = UserId::parse("@late:hs.test").unwrap();
        let before = local.kv.rows_read();
        local.service.rooms().join_room(&late, &room, None).await.unwrap();
        local.kv.rows_read() - before
    }
    // As above: member counts a multiple of the snapshot interval apart.
    let small = reads_for_one_join(2 + 64).await;
    let big = reads_for_one_join(2 + 5 * 64).await;
    assert_eq!(small, big, "rows read for one join: {small} with 67 members, {big} with 323");
}

/// A room this server has never seen is entered by an event that comes with its state (as a
/// join through another server will): the state events arrive as outliers, the event is placed
/// with that state, the room's current state and front are set from it, and a local user can
/// then join with an event the other server accepts.
#[tokio::test]
async fn a_room_new_to_this_server_is_entered_with_the_state_another_server_gives() {
    let (local, remote) = (server("hs.test"), server("remote.test"));
    let keys = keys_of(&[&local, &remote]);
    let rita = UserId::parse("@rita:remote.test").unwrap();
    let bob = UserId::parse("@bob:hs.test").unwrap();
    let request =
        CreateRoom { preset: Some(super::Preset::PublicChat), name: Some("Far away".into()), ..Default::default() };
    let room = remote.service.rooms().create_room(&rita, request).await.unwrap();
    let version = remote.service.rooms().room_version(&room).await.unwrap();
    let latest = say(&remote, &room, &rita, "hello from afar").await;
    let state = state_ids(&remote, &room).await;
    let origin = remote.service.server_name();

    let unknown = local
        .service
        .rooms()
        .ingest_placed(
            &version,
            {
                let bytes = serde_json::to_vec(&json_of(&remote, &latest).await).unwrap();
                local.service.rooms().check_remote_pdu(origin, &version, &bytes, &keys).unwrap()
            },
            Arrival::Live,
            None,
        )
        .await;
    assert!(matches!(unknown, Err(ServiceError::NotFound(_))), "without state the room is unknown: {unknown:?}");

    let mut by_depth = Vec::new();
    for id in state.values() {
        let bytes = serde_json::to_vec(&json_of(&remote, id).await).unwrap();
        let pdu = local.service.rooms().check_remote_pdu(origin, &version, &bytes, &keys).unwrap();
        by_depth.push((u64::from(pdu.depth()), pdu));
    }
    by_depth.sort_by_key(|(depth, _)| *depth);
    for (_, pdu) in by_depth {
        assert_eq!(local.service.rooms().ingest_outlier(&version, pdu).await.unwrap().outcome, Outcome::Outlier);
    }
    let bytes = serde_json::to_vec(&json_of(&remote, &latest).await).unwrap();
    let pdu = local.service.rooms().check_remote_pdu(origin, &version, &bytes, &keys).unwrap();
    let entered = local.service.rooms().ingest_placed(&version, pdu, Arrival::Live, Some(&state)).await.unwrap();
    assert_eq!(entered.outcome, Outcome::Accepted);

    assert_eq!(state_ids(&local, &room).await, state, "the current state is the one given");
    let record = room_record(&local, &room).await;
    assert_eq!(record.forward_extremities, [latest.to_string()]);
    assert_eq!(
        Some(record.create_event_id.as_str()),
        state.get(&(ruma::events::StateEventType::RoomCreate, String::new())).map(|id| id.as_str())
    );
    assert_eq!(record.member_counts.map(|counts| counts.joined), Some(1));
    assert!(current(&local, &room, "m.room.member", rita.as_str()).await.is_some());

    let join = local.service.rooms().join_room(&bob, &room, None).await.unwrap();
    let shared = Shared { local, remote, keys, room: room.clone(), version, alice: bob.clone(), rita };
    assert_eq!(relay(&shared, &shared.local, &shared.remote, &join).await, Outcome::Accepted);
    assert_eq!(current(&shared.remote, &room, "m.room.member", bob.as_str()).await.as_deref(), Some(join.as_str()));

    // The create event, an outlier since the room was entered, is refused live but placed in
    // history when backfill reaches the start of the room.
    let create = OwnedEventId::try_from(record.create_event_id.clone()).unwrap();
    let rooms = shared.local.service.rooms();
    let live = rooms.ingest(&shared.version, checked(&shared, &shared.remote, &create).await).await;
    assert!(matches!(live, Err(ServiceError::Forbidden(_))), "{live:?}");
    let pdu = checked(&shared, &shared.remote, &create).await;
    let placed = rooms.ingest_placed(&shared.version, pdu, Arrival::Backfill, None).await.unwrap();
    assert_eq!(placed.outcome, Outcome::Accepted);
    assert!(record_of(&shared.local, &create).await.unwrap().order.is_some(), "in the room's history");
    assert_eq!(room_record(&shared.local, &room).await.create_event_id, create.as_str(), "the room is unchanged");
}

#[tokio::test]
async fn only_this_servers_events_are_owed_to_other_servers_even_in_rows_written_before_the_flag() {
    let shared = shared_room().await;
    let rooms = shared.local.service.rooms();
    let mine = say(&shared.local, &shared.room, &shared.alice, "mine").await;
    let theirs = say(&shared.remote, &shared.room, &shared.rita, "theirs").await;
    assert_eq!(relay(&shared, &shared.remote, &shared.local, &theirs).await, Outcome::Accepted);
    let (owed, _) = rooms.owed_events_after(0, 1_000).await.unwrap();
    assert_eq!(owed.len(), timeline(&shared.local, &shared.room).await.len() - 2, "all but rita's join and message");
    let senders: Vec<String> = owed
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(&e.pdu_json).unwrap()["sender"].as_str().unwrap().to_owned())
        .collect();
    assert!(senders.iter().all(|sender| sender.ends_with(":hs.test")), "{senders:?}");
    let mine_position = record_of(&shared.local, &mine).await.unwrap().stream_position.unwrap();
    assert!(owed.iter().any(|event| event.position == mine_position));

    // A row from before the sender's side was recorded: the forwarder reads the event instead.
    let theirs_position = record_of(&shared.local, &theirs).await.unwrap().stream_position.unwrap();
    let mut batch = lattice_storage::WriteBatch::new();
    let row = keys::room_activity(keys::ACTIVITY_EVENTS, theirs_position, shared.room.as_str());
    batch.put(Table::RoomActivity, row, Vec::new());
    shared.local.kv.write(batch).await.unwrap();
    let (again, _) = rooms.owed_events_after(0, 1_000).await.unwrap();
    let positions = |owed: &[super::peers::OwedEvent]| owed.iter().map(|e| e.position).collect::<Vec<_>>();
    assert_eq!(positions(&again), positions(&owed));
}

#[tokio::test]
async fn an_event_read_for_auth_checks_is_read_redacted_once_its_redaction_is_stored() {
    let shared = shared_room().await;
    let rooms = shared.local.service.rooms();
    let secret = say(&shared.local, &shared.room, &shared.alice, "secret").await;
    let body = |loaded: &super::ingest::Loaded| {
        serde_json::to_value(loaded[&secret].object()).unwrap()["content"]["body"].as_str().map(str::to_owned)
    };
    // Read once, so that its parsed form is kept.
    let mut loaded = super::ingest::Loaded::new();
    rooms.load_events(&shared.version, std::slice::from_ref(&secret), &mut loaded).await.unwrap();
    assert_eq!(body(&loaded).as_deref(), Some("secret"));

    let content = json!({ "redacts": secret });
    rooms.send_event(&shared.alice, &shared.room, "m.room.redaction", None, content, None).await.unwrap();
    let mut loaded = super::ingest::Loaded::new();
    rooms.load_events(&shared.version, std::slice::from_ref(&secret), &mut loaded).await.unwrap();
    assert_eq!(body(&loaded), None, "the kept parse of the original must not outlive the redaction");
}

/// The forwarder asks for a room's joined servers on every pass that has events to queue: in a
/// room whose state did not change since, that reads no member, however many there are.
#[tokio::test]
async fn joined_servers_of_an_unchanged_room_cost_the_same_in_a_big_room_as_in_a_small_one() {
    async fn reads_for_joined_servers(members: usize) -> u64 {
        let (local, room, alice) = warm_room_of_local_members(members).await;
        local.service.rooms().joined_servers(&room).await.unwrap();
        say(&local, &room, &alice, "no state change").await;
        let before = local.kv.rows_read();
        let servers = local.service.rooms().joined_servers(&room).await.unwrap();
        assert_eq!(servers.into_iter().map(|s| s.to_string()).collect::<Vec<_>>(), ["hs.test"]);
        local.kv.rows_read() - before
    }
    let small = reads_for_joined_servers(2).await;
    let big = reads_for_joined_servers(300).await;
    assert_eq!(small, big, "rows read for joined servers: {small} with 3 members, {big} with 301");
}

#[tokio::test]
async fn joined_servers_follow_joins_and_leaves_of_other_servers() {
    let shared = shared_room().await;
    let rooms = shared.local.service.rooms();
    let names = |servers: std::collections::BTreeSet<ruma::OwnedServerName>| {
        servers.into_iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(rooms.joined_servers(&shared.room).await.unwrap()), ["hs.test", "remote.test"]);
    let remote_rooms = shared.remote.service.rooms();
    let leave = remote_rooms.set_membership(&shared.rita, &shared.room, &shared.rita, "leave", None).await.unwrap();
    assert_eq!(relay(&shared, &shared.remote, &shared.local, &leave).await, Outcome::Accepted);
    assert_eq!(names(rooms.joined_servers(&shared.room).await.unwrap()), ["hs.test"], "rita left");
}
