//! The ingest path on the in-memory store: linear history, rejection, forks and merges, soft
//! failure, idempotency, and nothing written when an event cannot be placed.

use std::sync::Arc;

use lattice_core::room_builder::RoomBuilder;
use lattice_storage::{Direction, KeyRange, KvRead, KvStore, MemoryStore, Table, keys};
use ruma::OwnedEventId;
use serde_json::json;

use super::{Ingested, Outcome};
use crate::{PasswordHasher, Service, SystemClock};

const ALICE: &str = "@alice:hs.test";
const BOB: &str = "@bob:hs.test";
const DAVE: &str = "@dave:hs.test";

pub(super) fn service() -> (Service, Arc<MemoryStore>) {
    service_named("hs.test")
}

/// A service on an in-memory store for the server `name`.
pub(super) fn service_named(name: &str) -> (Service, Arc<MemoryStore>) {
    let kv = Arc::new(MemoryStore::new());
    let config = crate::test_config(name);
    (
        Service::new(
            config,
            kv.clone(),
            Arc::new(SystemClock),
            PasswordHasher::new(64, 1).unwrap(),
            crate::test_signing_key(),
        ),
        kv,
    )
}

async fn ingest(service: &Service, room: &RoomBuilder, id: &OwnedEventId) -> Ingested {
    service.rooms().ingest(room.version(), room.get(id).unwrap().clone()).await.unwrap()
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

async fn extremities(kv: &MemoryStore, room_id: &str) -> Vec<String> {
    let room = kv.get(Table::Rooms, &keys::room(room_id)).await.unwrap().unwrap();
    serde_json::from_slice::<lattice_storage::records::RoomRecord>(&room).unwrap().forward_extremities
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
    setup_version("10")
}

fn setup_version(version: &str) -> Setup {
    let mut room = RoomBuilder::new(version);
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
    assert_eq!(extremities(&kv, ROOM).await, vec![s.bob.to_string()]);
    let timeline = rows(&kv, Table::Timeline, ROOM).await;
    assert_eq!(timeline, [&s.create, &s.alice, &s.power, &s.rules, &s.bob].map(|id| id.to_string()));
    let membership = kv.get(Table::Memberships, &keys::membership(BOB, ROOM)).await.unwrap();
    assert_eq!(membership.as_deref(), Some(&b"join"[..]));

    // Auth chains are walked from the stored events, not stored per event.
    assert!(kv.scan(Table::AuthChains, &KeyRange::all(), Direction::Forward, 1).await.unwrap().is_empty());

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
    assert_eq!(extremities(&kv, ROOM).await, vec![s.bob.to_string()]);
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
    assert_eq!(extremities(&kv, ROOM).await, vec![ban.to_string()]);
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
    let mut tips = extremities(&kv, ROOM).await;
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
    assert_eq!(extremities(&kv, ROOM).await, vec![merge.to_string()]);
    assert_eq!(current_state(&kv, ROOM, "m.room.name", "").await.as_deref(), Some(name.as_str()));
}

#[tokio::test]
async fn an_event_with_unknown_prev_events_writes_nothing() {
    let (service, kv) = service();
    let s = setup();
    ingest(&service, &s.room, &s.create).await;
    let before = kv.snapshot().await.unwrap();
    let result = service.rooms().ingest(s.room.version(), s.room.get(&s.power).unwrap().clone()).await;
    assert!(matches!(result, Err(crate::ServiceError::MissingEvents(_))), "{result:?}");
    for table in [Table::Events, Table::Timeline, Table::StateGroups, Table::CurrentState, Table::Rooms] {
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
            tokio::spawn(async move {
                service.rooms().ingest(room.version(), room.get(&id).unwrap().clone()).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().outcome, Outcome::Accepted);
    }
    let mut tips = extremities(&kv, ROOM).await;
    tips.sort();
    let mut expected: Vec<String> = topics.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(tips, expected, "no concurrent write lost another's extremity");
    let topic = current_state(&kv, ROOM, "m.room.topic", "").await.unwrap();
    assert!(expected.contains(&topic));
}

#[tokio::test]
async fn state_storage_grows_with_state_changes_not_with_events() {
    let (service, kv) = service();
    let mut s = setup();
    for id in [&s.create, &s.alice, &s.power, &s.rules, &s.bob] {
        ingest(&service, &s.room, id).await;
    }
    let groups = || async { kv.scan(Table::StateGroups, &KeyRange::all(), Direction::Forward, 10_000).await.unwrap() };
    let before = groups().await;
    let (create, power, bob) = (s.create.clone(), s.power.clone(), s.bob.clone());
    let mut tip = bob.clone();
    for i in 0..200 {
        tip = s.room.event(
            BOB,
            "m.room.message",
            None,
            json!({ "body": format!("message {i}") }),
            &[&tip],
            &[&create, &power, &bob],
        );
        assert_eq!(ingest(&service, &s.room, &tip).await.outcome, Outcome::Accepted);
    }
    assert_eq!(groups().await.len(), before.len(), "messages reuse their parent's state group");
    // Each state change adds one small delta, not a copy of the state.
    for i in 0..10 {
        tip = s.room.event(
            BOB,
            "m.room.member",
            Some(BOB),
            json!({ "membership": "join", "displayname": format!("bob {i}") }),
            &[&tip],
            &[&create, &power, &bob, &s.rules],
        );
        assert_eq!(ingest(&service, &s.room, &tip).await.outcome, Outcome::Accepted);
    }
    let after = groups().await;
    assert_eq!(after.len(), before.len() + 10);
    let newest: lattice_storage::records::StateGroupRecord = serde_json::from_slice(&after.last().unwrap().1).unwrap();
    assert_eq!(newest.delta.len(), 1);
}

#[tokio::test]
async fn local_events_are_built_signed_and_accepted_in_every_room_version_family() {
    use lattice_core::room_version::RoomVersion;
    use ruma::{OwnedRoomId, UserId};

    use super::LocalEvent;

    for id in ["1", "2", "3", "6", "10", "11", "12"] {
        let (service, kv) = service();
        let version = RoomVersion::parse(id).unwrap();
        let alice = UserId::parse(ALICE).unwrap();
        let derives_room_id = version.rules().authorization.room_create_event_id_as_room_id;
        let mut create_content = json!({ "room_version": id });
        if !version.rules().authorization.use_room_create_sender {
            create_content["creator"] = json!(ALICE);
        }
        let chosen: OwnedRoomId = "!local:hs.test".try_into().unwrap();
        let create = service
            .rooms()
            .build_local_event(
                &version,
                LocalEvent {
                    room_id: (!derives_room_id).then_some(&*chosen),
                    sender: &alice,
                    kind: "m.room.create",
                    state_key: Some(""),
                    content: create_content,
                },
            )
            .await
            .unwrap();
        let room_id: OwnedRoomId = if derives_room_id {
            format!("!{}", &create.id().as_str()[1..]).try_into().unwrap()
        } else {
            chosen.clone()
        };
        assert_eq!(service.rooms().ingest(&version, create).await.unwrap().outcome, Outcome::Accepted, "v{id} create");

        let steps = [
            ("m.room.member", Some(ALICE), json!({ "membership": "join" })),
            (
                "m.room.power_levels",
                Some(""),
                json!({ "users": if derives_room_id { json!({}) } else { json!({ ALICE: 100 }) } }),
            ),
            ("m.room.join_rules", Some(""), json!({ "join_rule": "invite" })),
            ("m.room.message", None, json!({ "msgtype": "m.text", "body": "hello" })),
        ];
        let mut last = None;
        for (kind, key, content) in steps {
            let event = service
                .rooms()
                .build_local_event(
                    &version,
                    LocalEvent { room_id: Some(&room_id), sender: &alice, kind, state_key: key, content },
                )
                .await
                .unwrap();
            // Signed by this server, verifiable with its public key.
            let mut keys = ruma::signatures::PublicKeyMap::new();
            let key_pair = &service.rooms().signing_key;
            keys.insert(
                "hs.test".into(),
                [(format!("ed25519:{}", key_pair.version()), ruma::serde::Base64::new(key_pair.public_key().to_vec()))]
                    .into(),
            );
            let checked =
                lattice_core::pdu::check_signatures_and_hashes(event.object().clone(), &version, &keys).unwrap();
            assert!(matches!(checked, lattice_core::pdu::Checked::Intact(_)), "v{id} {kind}");
            let event_id = event.id().to_owned();
            let ingested = service.rooms().ingest(&version, event).await.unwrap();
            assert_eq!(ingested.outcome, Outcome::Accepted, "v{id} {kind}");
            last = Some(event_id);
        }
        assert_eq!(extremities(&kv, room_id.as_str()).await, vec![last.unwrap().to_string()], "v{id}");
        assert_eq!(rows(&kv, Table::Timeline, room_id.as_str()).await.len(), 5, "v{id}");
    }
}

#[tokio::test]
async fn redactions_replace_the_stored_event_when_allowed() {
    for version in ["10", "11"] {
        let (service, kv) = service();
        let Setup { mut room, create, alice, power, rules, bob } = setup_version(version);
        let eve = "@eve:elsewhere.test";
        let eve_join = room.event(
            eve,
            "m.room.member",
            Some(eve),
            json!({ "membership": "join" }),
            &[&bob],
            &[&create, &power, &rules],
        );
        let hello =
            room.event(BOB, "m.room.message", None, json!({ "body": "hello" }), &[&eve_join], &[&create, &power, &bob]);
        let secret =
            room.event(BOB, "m.room.message", None, json!({ "body": "secret" }), &[&hello], &[&create, &power, &bob]);
        // eve, on another server and below the redact level, redacts bob's "hello".
        let by_eve = room.redaction(eve, &hello, &[&secret], &[&create, &power, &eve_join]);
        // alice holds the power: her redaction of "secret" takes effect.
        let by_alice = room.redaction(ALICE, &secret, &[&by_eve], &[&create, &power, &alice]);
        for id in [&create, &alice, &power, &rules, &bob, &eve_join, &hello, &secret, &by_eve, &by_alice] {
            let ingested = ingest(&service, &room, id).await;
            assert!(!matches!(ingested.outcome, Outcome::Rejected(_)), "v{version} {id}: {ingested:?}");
        }
        let body_of = |id: &OwnedEventId| {
            let (kv, id) = (kv.clone(), id.clone());
            async move {
                let raw = kv.get(Table::Events, &keys::event(id.as_str())).await.unwrap().unwrap();
                let record: lattice_storage::records::EventRecord = serde_json::from_slice(&raw).unwrap();
                serde_json::from_str::<serde_json::Value>(&record.json).unwrap()["content"].clone()
            }
        };
        assert_eq!(body_of(&hello).await, json!({ "body": "hello" }), "v{version}: eve's redaction does not apply");
        assert_eq!(body_of(&secret).await, json!({}), "v{version}: alice's redaction applies");
    }
}

#[tokio::test]
async fn received_pdus_are_checked_before_anything_is_stored() {
    use lattice_core::pdu::PduError;
    use lattice_core::room_version::RoomVersion;
    use ruma::UserId;

    use super::LocalEvent;

    // The origin server builds and signs a room; a second server receives its PDUs as bytes.
    let (origin, _) = service();
    let (receiver, kv) = service();
    let version = RoomVersion::parse("12").unwrap();
    let alice = UserId::parse(ALICE).unwrap();
    let mut keys = ruma::signatures::PublicKeyMap::new();
    keys.insert(
        "hs.test".into(),
        [(
            format!("ed25519:{}", origin.rooms().signing_key.version()),
            ruma::serde::Base64::new(origin.rooms().signing_key.public_key().to_vec()),
        )]
        .into(),
    );
    let create = origin
        .rooms()
        .build_local_event(
            &version,
            LocalEvent {
                room_id: None,
                sender: &alice,
                kind: "m.room.create",
                state_key: Some(""),
                content: json!({ "room_version": "12" }),
            },
        )
        .await
        .unwrap();
    let room_id: ruma::OwnedRoomId = format!("!{}", &create.id().as_str()[1..]).try_into().unwrap();
    let create_bytes = serde_json::to_vec(create.object()).unwrap();
    origin.rooms().ingest(&version, create).await.unwrap();
    let join = origin
        .rooms()
        .build_local_event(
            &version,
            LocalEvent {
                room_id: Some(&room_id),
                sender: &alice,
                kind: "m.room.member",
                state_key: Some(ALICE),
                content: json!({ "membership": "join", "displayname": "Alice" }),
            },
        )
        .await
        .unwrap();
    let join_value = serde_json::to_value(join.object()).unwrap();

    let snapshot = kv.snapshot().await.unwrap();
    let mut forged_signature = join_value.clone();
    forged_signature["origin_server_ts"] = json!(1);
    type Case = (Vec<u8>, fn(&crate::ServiceError) -> bool);
    let bad_inputs: Vec<Case> = vec![
        (b"{not json".to_vec(), |e| matches!(e, crate::ServiceError::InvalidPdu(PduError::NotCanonicalJson(_)))),
        (vec![b' '; 70_000], |e| matches!(e, crate::ServiceError::InvalidPdu(PduError::TooLarge { .. }))),
        (serde_json::to_vec(&forged_signature).unwrap(), |e| {
            matches!(e, crate::ServiceError::InvalidPdu(PduError::Signature(_)))
        }),
        (serde_json::to_vec(&join_value).unwrap(), |e| matches!(e, crate::ServiceError::NotFound(_))),
    ];
    for (bytes, expected) in bad_inputs {
        let error = receiver.rooms().receive_pdu(alice.server_name(), &version, &bytes, &keys).await.unwrap_err();
        assert!(expected(&error), "{error:?}");
    }
    for table in
        [Table::Events, Table::Rooms, Table::StateGroups, Table::Timeline, Table::CurrentState, Table::Counters]
    {
        let then = snapshot.scan(table, &KeyRange::all(), Direction::Forward, 100).await.unwrap();
        let now = kv.scan(table, &KeyRange::all(), Direction::Forward, 100).await.unwrap();
        assert_eq!(then, now, "{table:?} untouched by refused PDUs");
    }

    // Valid bytes go through; a changed content keeps only the redacted event.
    assert_eq!(
        receiver.rooms().receive_pdu(alice.server_name(), &version, &create_bytes, &keys).await.unwrap().outcome,
        Outcome::Accepted
    );
    let mut tampered = join_value.clone();
    tampered["content"]["displayname"] = json!("Mallory");
    let ingested = receiver
        .rooms()
        .receive_pdu(alice.server_name(), &version, &serde_json::to_vec(&tampered).unwrap(), &keys)
        .await
        .unwrap();
    assert_eq!(ingested.outcome, Outcome::Accepted, "the redacted join still passes auth");
    let raw = kv.get(Table::Events, &keys::event(ingested.event_id.as_str())).await.unwrap().unwrap();
    let record: lattice_storage::records::EventRecord = serde_json::from_slice(&raw).unwrap();
    let stored: serde_json::Value = serde_json::from_str(&record.json).unwrap();
    assert_eq!(stored["content"], json!({ "membership": "join" }), "only the redacted form is kept");
}

#[tokio::test]
async fn a_redaction_that_arrives_before_its_target_applies_when_the_target_comes() {
    let (service, kv) = service();
    let Setup { mut room, create, alice, power, rules, bob } = setup();
    for id in [&create, &alice, &power, &rules, &bob] {
        ingest(&service, &room, id).await;
    }
    // Two branches from bob's join: bob's message, and alice's redaction of it.
    let message =
        room.event(BOB, "m.room.message", None, json!({ "body": "regret" }), &[&bob], &[&create, &power, &bob]);
    let redaction = room.redaction(ALICE, &message, &[&bob], &[&create, &power, &alice]);
    assert_eq!(ingest(&service, &room, &redaction).await.outcome, Outcome::Accepted);
    let pending =
        kv.get(Table::PendingRedactions, &keys::pending_redaction(message.as_str(), redaction.as_str())).await.unwrap();
    assert!(pending.is_some(), "the redaction waits for its target");

    assert_eq!(ingest(&service, &room, &message).await.outcome, Outcome::Accepted);
    let raw = kv.get(Table::Events, &keys::event(message.as_str())).await.unwrap().unwrap();
    let record: lattice_storage::records::EventRecord = serde_json::from_slice(&raw).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&record.json).unwrap()["content"], json!({}));
    let pending =
        kv.get(Table::PendingRedactions, &keys::pending_redaction(message.as_str(), redaction.as_str())).await.unwrap();
    assert!(pending.is_none(), "the pending row is gone");
}
