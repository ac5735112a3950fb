//! The ingest path on the in-memory store: linear history, rejection, forks and merges, soft
//! failure, idempotency, and nothing written when an event cannot be placed.

use std::sync::Arc;

use lattice_core::room_builder::RoomBuilder;
use lattice_storage::{Direction, KeyRange, KvRead, KvStore, MemoryStore, Table, keys};
use ruma::OwnedEventId;
use serde_json::json;

use super::{Ingested, Outcome};
use crate::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};

const ALICE: &str = "@alice:hs.test";
const BOB: &str = "@bob:hs.test";
const DAVE: &str = "@dave:hs.test";

fn service() -> (Service, Arc<MemoryStore>) {
    let kv = Arc::new(MemoryStore::new());
    let config = ServiceConfig {
        server_name: "hs.test".try_into().unwrap(),
        registration: RegistrationMode::Token,
        refreshable_token_lifetime_ms: 60_000,
    };
    (Service::new(config, kv.clone(), Arc::new(SystemClock), PasswordHasher::new(64, 1).unwrap()), kv)
}

async fn ingest(service: &Service, room: &RoomBuilder, id: &OwnedEventId) -> Ingested {
    service.ingest(room.version(), room.get(id).unwrap().clone()).await.unwrap()
}

async fn current_state(kv: &MemoryStore, room_id: &str, kind: &str, key: &str) -> Option<String> {
    let raw = kv.get(Table::CurrentState, &keys::current_state(room_id, kind, key)).await.unwrap();
    raw.map(|bytes| String::from_utf8(bytes).unwrap())
}

async fn rows(kv: &MemoryStore, table: Table, room_id: &str) -> Vec<String> {
    let prefix = keys::room_rows(room_id);
    let rows = kv.scan(table, &KeyRange::prefix(&prefix), Direction::Forward, 100).await.unwrap();
    rows.into_iter()
        .map(|(key, value)| {
            if value.is_empty() {
                String::from_utf8_lossy(&key[prefix.len()..]).into_owned()
            } else {
                String::from_utf8(value).unwrap()
            }
        })
        .collect()
}

/// create → alice joins → power levels → public join rules → bob joins.
struct Setup {
    room: RoomBuilder,
    create: OwnedEventId,
    alice: OwnedEventId,
    power: OwnedEventId,
    rules: OwnedEventId,
    bob: OwnedEventId,
}

fn setup() -> Setup {
    let mut room = RoomBuilder::new("10");
    let create = room.create(ALICE);
    let alice =
        room.event(ALICE, "m.room.member", Some(ALICE), json!({ "membership": "join" }), &[&create], &[&create]);
    let power = room.event(
        ALICE,
        "m.room.power_levels",
        Some(""),
        json!({ "users": { ALICE: 100 } }),
        &[&alice],
        &[&create, &alice],
    );
    let rules = room.event(
        ALICE,
        "m.room.join_rules",
        Some(""),
        json!({ "join_rule": "public" }),
        &[&power],
        &[&create, &alice, &power],
    );
    let bob = room.event(
        BOB,
        "m.room.member",
        Some(BOB),
        json!({ "membership": "join" }),
        &[&rules],
        &[&create, &power, &rules],
    );
    Setup { room, create, alice, power, rules, bob }
}

const ROOM: &str = "!room:hs.test";

#[tokio::test]
async fn a_linear_history_builds_state_timeline_and_memberships() {
    let (service, kv) = service();
    let s = setup();
    let mut positions = Vec::new();
    for id in [&s.create, &s.alice, &s.power, &s.rules, &s.bob] {
        let ingested = ingest(&service, &s.room, id).await;
        assert_eq!(ingested.outcome, Outcome::Accepted, "{id}");
        positions.push(ingested.stream_position.unwrap());
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "stream positions increase: {positions:?}");
    assert_eq!(current_state(&kv, ROOM, "m.room.member", BOB).await.as_deref(), Some(s.bob.as_str()));
    assert_eq!(current_state(&kv, ROOM, "m.room.join_rules", "").await.as_deref(), Some(s.rules.as_str()));
    assert_eq!(rows(&kv, Table::ForwardExtremities, ROOM).await, vec![s.bob.to_string()]);
    let timeline = rows(&kv, Table::Timeline, ROOM).await;
    assert_eq!(timeline, [&s.create, &s.alice, &s.power, &s.rules, &s.bob].map(|id| id.to_string()));
    let membership = kv.get(Table::Memberships, &keys::membership(BOB, ROOM)).await.unwrap();
    assert_eq!(membership.as_deref(), Some(&b"join"[..]));

    // Ingesting again changes nothing and answers the same.
    let again = ingest(&service, &s.room, &s.bob).await;
    assert_eq!(again.stream_position, Some(positions[4]));
    assert_eq!(rows(&kv, Table::Timeline, ROOM).await.len(), 5);
}

#[tokio::test]
async fn a_forbidden_event_is_stored_as_rejected_and_changes_nothing() {
    let (service, kv) = service();
    let mut s = setup();
    for id in [&s.create, &s.alice, &s.power, &s.rules, &s.bob] {
        ingest(&service, &s.room, id).await;
    }
    // bob (power 0) tries to change the join rules.
    let (create, power, bob) = (s.create.clone(), s.power.clone(), s.bob.clone());
    let grab = s.room.event(
        BOB,
        "m.room.join_rules",
        Some(""),
        json!({ "join_rule": "invite" }),
        &[&bob],
        &[&create, &power, &bob],
    );
    let ingested = ingest(&service, &s.room, &grab).await;
    assert!(matches!(ingested.outcome, Outcome::Rejected(_)), "{ingested:?}");
    assert_eq!(ingested.stream_position, None);
    assert_eq!(current_state(&kv, ROOM, "m.room.join_rules", "").await.as_deref(), Some(s.rules.as_str()));
    assert_eq!(rows(&kv, Table::ForwardExtremities, ROOM).await, vec![s.bob.to_string()]);
    assert_eq!(rows(&kv, Table::Timeline, ROOM).await.len(), 5);
}

#[tokio::test]
async fn forks_are_resolved_merged_and_late_events_soft_fail() {
    let (service, kv) = service();
    let mut s = setup();
    for id in [&s.create, &s.alice, &s.power, &s.rules, &s.bob] {
        ingest(&service, &s.room, id).await;
    }
    let (create, alice, power, rules, bob) =
        (s.create.clone(), s.alice.clone(), s.power.clone(), s.rules.clone(), s.bob.clone());
    // Two branches from bob's join: alice bans dave; dave joins.
    let ban = s.room.event(
        ALICE,
        "m.room.member",
        Some(DAVE),
        json!({ "membership": "ban" }),
        &[&bob],
        &[&create, &power, &alice],
    );
    let join = s.room.event(
        DAVE,
        "m.room.member",
        Some(DAVE),
        json!({ "membership": "join" }),
        &[&bob],
        &[&create, &power, &rules],
    );
    assert_eq!(ingest(&service, &s.room, &ban).await.outcome, Outcome::Accepted);
    // Dave's join is fine against the state before it, but the room's current state has him
    // banned: soft failure. It is stored but not shown and not built on.
    let late = ingest(&service, &s.room, &join).await;
    assert!(matches!(late.outcome, Outcome::SoftFailed(_)), "{late:?}");
    assert_eq!(rows(&kv, Table::ForwardExtremities, ROOM).await, vec![ban.to_string()]);
    assert_eq!(current_state(&kv, ROOM, "m.room.member", DAVE).await.as_deref(), Some(ban.as_str()));
    let dave = kv.get(Table::Memberships, &keys::membership(DAVE, ROOM)).await.unwrap();
    assert_eq!(dave.as_deref(), Some(&b"ban"[..]));

    // A real fork: bob sets a topic on one branch while alice renames the room on the other.
    let topic =
        s.room.event(ALICE, "m.room.topic", Some(""), json!({ "topic": "t" }), &[&ban], &[&create, &power, &alice]);
    let name =
        s.room.event(ALICE, "m.room.name", Some(""), json!({ "name": "n" }), &[&ban], &[&create, &power, &alice]);
    assert_eq!(ingest(&service, &s.room, &topic).await.outcome, Outcome::Accepted);
    assert_eq!(ingest(&service, &s.room, &name).await.outcome, Outcome::Accepted);
    let mut tips = rows(&kv, Table::ForwardExtremities, ROOM).await;
    tips.sort();
    let mut expected = vec![topic.to_string(), name.to_string()];
    expected.sort();
    assert_eq!(tips, expected);
    // The current state holds both sides; the merge event's state does too.
    assert_eq!(current_state(&kv, ROOM, "m.room.topic", "").await.as_deref(), Some(topic.as_str()));
    assert_eq!(current_state(&kv, ROOM, "m.room.name", "").await.as_deref(), Some(name.as_str()));
    let merge = s.room.event(
        ALICE,
        "m.room.message",
        None,
        json!({ "body": "merged" }),
        &[&topic, &name],
        &[&create, &power, &alice],
    );
    assert_eq!(ingest(&service, &s.room, &merge).await.outcome, Outcome::Accepted);
    assert_eq!(rows(&kv, Table::ForwardExtremities, ROOM).await, vec![merge.to_string()]);
    assert_eq!(current_state(&kv, ROOM, "m.room.name", "").await.as_deref(), Some(name.as_str()));
}

#[tokio::test]
async fn an_event_with_unknown_prev_events_writes_nothing() {
    let (service, kv) = service();
    let s = setup();
    ingest(&service, &s.room, &s.create).await;
    let before = kv.snapshot().await.unwrap();
    let result = service.ingest(s.room.version(), s.room.get(&s.power).unwrap().clone()).await;
    assert!(matches!(result, Err(crate::ServiceError::MissingEvents(_))), "{result:?}");
    for table in [Table::Events, Table::Timeline, Table::ForwardExtremities, Table::CurrentState, Table::Rooms] {
        let then = before.scan(table, &KeyRange::all(), Direction::Forward, 100).await.unwrap();
        let now = kv.scan(table, &KeyRange::all(), Direction::Forward, 100).await.unwrap();
        assert_eq!(then, now, "{table:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_siblings_all_become_forward_extremities() {
    let (service, kv) = service();
    let mut s = setup();
    for id in [&s.create, &s.alice, &s.power, &s.rules, &s.bob] {
        ingest(&service, &s.room, id).await;
    }
    let (create, alice, power, bob) = (s.create.clone(), s.alice.clone(), s.power.clone(), s.bob.clone());
    let topics: Vec<OwnedEventId> = (0..8)
        .map(|i| {
            s.room.event(
                ALICE,
                "m.room.topic",
                Some(""),
                json!({ "topic": format!("t{i}") }),
                &[&bob],
                &[&create, &power, &alice],
            )
        })
        .collect();
    let service = Arc::new(service);
    let room = Arc::new(s.room);
    let tasks: Vec<_> = topics
        .iter()
        .map(|id| {
            let (service, room, id) = (service.clone(), room.clone(), id.clone());
            tokio::spawn(async move { service.ingest(room.version(), room.get(&id).unwrap().clone()).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().outcome, Outcome::Accepted);
    }
    let mut tips = rows(&kv, Table::ForwardExtremities, ROOM).await;
    tips.sort();
    let mut expected: Vec<String> = topics.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(tips, expected, "no concurrent write lost another's extremity");
    let topic = current_state(&kv, ROOM, "m.room.topic", "").await.unwrap();
    assert!(expected.contains(&topic));
}
