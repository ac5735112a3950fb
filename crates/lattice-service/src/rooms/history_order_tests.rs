//! The two orders of a room (issue #10): history (`/messages`, `/context`, `prev_batch`,
//! `/relations`) follows the room graph, `/sync` the arrival order, on a fork whose later
//! arrivals have a lower depth; and a backward page reports a recorded gap.

use std::time::Duration;

use lattice_core::room_builder::RoomBuilder;
use lattice_storage::{KvStore, Table, WriteBatch, keys};
use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};

use super::tests::service;
use super::{EventFilter, HistoryToken, Outcome, RelationsQuery, SyncFilter};
use crate::Service;
use crate::sync::{StreamSet, SyncRequest, SyncToken};

const ALICE: &str = "@alice:hs.test";
const BOB: &str = "@bob:hs.test";
const ROOM: &str = "!room:hs.test";

/// A room whose history forks: alice's m1 → m2 → m3 → m4 and bob's x, built on the same event
/// as m1 but arriving after m4 (so with a lower depth than events that arrived before it), then
/// alice's merge citing both.
struct Fork {
    room: RoomBuilder,
    /// create, alice's join, power levels, join rules, bob's join.
    setup: Vec<OwnedEventId>,
    m: Vec<OwnedEventId>,
    x: OwnedEventId,
    merge: OwnedEventId,
    /// The stream position of each event, by ID.
    positions: Vec<(OwnedEventId, u64)>,
}

impl Fork {
    fn position(&self, id: &OwnedEventId) -> u64 {
        self.positions.iter().find(|(event, _)| event == id).map(|(_, p)| *p).unwrap()
    }

    fn ids(&self, events: &[&OwnedEventId]) -> Vec<String> {
        events.iter().map(|id| id.to_string()).collect()
    }

    /// Every event, newest first in the room's topological order.
    fn history_backward(&self) -> Vec<String> {
        let [create, alice, power, rules, bob] = &self.setup[..] else { unreachable!() };
        let m = &self.m;
        self.ids(&[&self.merge, &m[3], &m[2], &m[1], &self.x, &m[0], bob, rules, power, alice, create])
    }
}

fn message(
    room: &mut RoomBuilder,
    sender: &str,
    body: &str,
    prev: &[&OwnedEventId],
    auth: &[&OwnedEventId],
) -> OwnedEventId {
    room.event(sender, "m.room.message", None, json!({ "msgtype": "m.text", "body": body }), prev, auth)
}

async fn ingest_all(service: &Service, room: &RoomBuilder, ids: &[&OwnedEventId]) -> Vec<(OwnedEventId, u64)> {
    let mut positions = Vec::new();
    for id in ids {
        let ingested = service.rooms().ingest(room.version(), room.get(id).unwrap().clone()).await.unwrap();
        assert_eq!(ingested.outcome, Outcome::Accepted, "{id}");
        positions.push(((*id).clone(), ingested.stream_position.unwrap()));
    }
    positions
}

async fn fork(service: &Service) -> Fork {
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
    let alice_auth = [&create, &power, &alice];
    let mut m = Vec::new();
    for i in 0..4 {
        let prev = m.last().unwrap_or(&bob).clone();
        m.push(message(&mut room, ALICE, &format!("m{}", i + 1), &[&prev], &alice_auth));
    }
    let x = message(&mut room, BOB, "x", &[&bob], &[&create, &power, &bob]);
    let merge = message(&mut room, ALICE, "merge", &[&m[3], &x], &alice_auth);
    let order: Vec<&OwnedEventId> =
        [&create, &alice, &power, &rules, &bob].into_iter().chain(&m).chain([&x, &merge]).collect();
    let positions = ingest_all(service, &room, &order).await;
    Fork { room, setup: vec![create, alice, power, rules, bob], m, x, merge, positions }
}

fn ids(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

fn ids_of(events: &[&OwnedEventId]) -> Vec<String> {
    events.iter().map(|id| id.to_string()).collect()
}

fn who(user: &str) -> (ruma::OwnedUserId, ruma::OwnedRoomId) {
    (UserId::parse(user).unwrap(), RoomId::parse(ROOM).unwrap())
}

fn token(text: &str) -> Option<HistoryToken> {
    Some(HistoryToken::parse(text).unwrap())
}

/// Every event `/messages` returns paging from `from` in pages of `limit`.
async fn page_all(service: &Service, from: Option<HistoryToken>, backward: bool, limit: usize) -> Vec<String> {
    let (alice, room) = who(ALICE);
    let mut from = from;
    let mut seen = Vec::new();
    for _ in 0..50 {
        let page = service
            .rooms()
            .messages(&alice, &room, (from, None), backward, limit, &EventFilter::default())
            .await
            .unwrap();
        assert!(page.gap.is_none(), "no gap recorded");
        seen.extend(ids(&page.response["chunk"]));
        match page.response["end"].as_str() {
            Some(end) => from = token(end),
            None => return seen,
        }
    }
    panic!("pagination did not end: {seen:?}");
}

fn sync_request(since: Option<SyncToken>, limit: u64) -> SyncRequest {
    let mut filter = SyncFilter::default();
    filter.room.timeline.limit = Some(limit);
    SyncRequest {
        since,
        timeout: Duration::ZERO,
        device_id: None,
        filter,
        full_state: false,
        set_presence: crate::presence::PresenceState::Online,
    }
}

#[tokio::test]
async fn messages_follow_depth_while_sync_follows_arrival() {
    let (service, _) = service();
    let f = fork(&service).await;
    let newest_first = f.history_backward();

    // /messages, in one page and in pages of two, backward and forward: depth order, x (which
    // arrived after m4) between m1 and m2, every event once.
    assert_eq!(page_all(&service, None, true, 100).await, newest_first);
    assert_eq!(page_all(&service, None, true, 2).await, newest_first);
    let oldest_first: Vec<String> = newest_first.iter().rev().cloned().collect();
    assert_eq!(page_all(&service, None, false, 3).await, oldest_first);

    // /sync: arrival order, each event exactly once across incremental syncs.
    let (alice, room) = who(ALICE);
    let initial = service.sync().sync(&alice, sync_request(None, 100)).await.unwrap();
    let arrival: Vec<String> = f.positions.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(ids(&initial["rooms"]["join"][ROOM]["timeline"]["events"]), arrival);
    // Synced up to m2, then incrementally: the rest in arrival order, once; then nothing.
    let mut delivered: Vec<String> = arrival.iter().take_while(|id| id.as_str() != f.m[2].as_str()).cloned().collect();
    let mut since = SyncToken { streams: StreamSet { events: f.position(&f.m[1]), ..Default::default() } };
    for _ in 0..2 {
        let body = service.sync().sync(&alice, sync_request(Some(since), 100)).await.unwrap();
        let timeline = &body["rooms"]["join"][ROOM]["timeline"];
        if !timeline.is_null() {
            assert_eq!(timeline["limited"], false);
            delivered.extend(ids(&timeline["events"]));
        }
        since = SyncToken::parse(body["next_batch"].as_str().unwrap()).unwrap();
    }
    assert_eq!(delivered, arrival, "each event once, in arrival order");

    // A /sync token taken before x arrived still works: it stands for m4 in the history, so a
    // backward page from it holds m4 and everything below m4 — x included, by depth.
    let before_x = format!("s{}", f.position(&f.m[3]));
    let from_m4 = page_all(&service, token(&before_x), true, 4).await;
    assert_eq!(from_m4, newest_first[1..]);
    let all = EventFilter::default();
    let after_m4 = service.rooms().messages(&alice, &room, (token(&before_x), None), false, 10, &all).await.unwrap();
    assert_eq!(ids(&after_m4.response["chunk"]), ids_of(&[&f.merge]));
}

#[tokio::test]
async fn prev_batch_continues_into_the_history_below_the_sync_timeline() {
    let (service, _) = service();
    let f = fork(&service).await;
    let (alice, _) = who(ALICE);
    // The newest three arrivals: m4, x, merge. History continues below m4, the oldest of them.
    let body = service.sync().sync(&alice, sync_request(None, 3)).await.unwrap();
    let timeline = &body["rooms"]["join"][ROOM]["timeline"];
    assert_eq!(ids(&timeline["events"]), ids_of(&[&f.m[3], &f.x, &f.merge]));
    assert_eq!(timeline["limited"], true);
    let prev_batch = timeline["prev_batch"].as_str().unwrap();
    assert!(prev_batch.starts_with('t'), "{prev_batch}");
    let older = page_all(&service, token(prev_batch), true, 2).await;
    // Nothing below m4 is skipped; x, on the other branch, sorts below m4 and so comes again.
    assert_eq!(older, f.history_backward()[2..]);
}

#[tokio::test]
async fn context_of_an_event_on_a_branch_is_its_neighbourhood_by_depth() {
    let (service, _) = service();
    let f = fork(&service).await;
    let (alice, room) = who(ALICE);
    let all = EventFilter::default();
    let context = service.rooms().event_context(&alice, &room, f.x.as_str(), 4, &all).await.unwrap();
    let bob = &f.setup[4];
    assert_eq!(ids(&context["events_before"]), ids_of(&[&f.m[0], bob]));
    assert_eq!(ids(&context["events_after"]), ids_of(&[&f.m[1], &f.m[2]]));
    // Its tokens continue with /messages on both sides without repeating or skipping.
    let (start, end) = (context["start"].as_str().unwrap(), context["end"].as_str().unwrap());
    let later = service.rooms().messages(&alice, &room, (token(end), None), false, 10, &all).await.unwrap();
    assert_eq!(ids(&later.response["chunk"]), ids_of(&[&f.m[3], &f.merge]));
    let earlier = page_all(&service, token(start), true, 10).await;
    assert_eq!(earlier, f.history_backward()[7..]);
}

#[tokio::test]
async fn relations_page_in_the_order_of_the_room_graph() {
    let (service, _) = service();
    let mut f = fork(&service).await;
    let setup = f.setup.clone();
    let [create, alice, power, _, bob] = &setup[..] else { unreachable!() };
    let react = |room: &mut RoomBuilder, sender: &str, key: &str, prev: &OwnedEventId, auth: &[&OwnedEventId]| {
        let content = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": f.m[0], "key": key } });
        room.event(sender, "m.reaction", None, content, &[prev], auth)
    };
    // alice reacts on top of the merge; then bob, on his branch (lower depth), arriving later.
    let high = react(&mut f.room, ALICE, "a", &f.merge.clone(), &[create, power, alice]);
    let low = react(&mut f.room, BOB, "b", &f.x.clone(), &[create, power, bob]);
    ingest_all(&service, &f.room, &[&high, &low]).await;

    let (alice_id, room) = who(ALICE);
    let page = |from: Option<HistoryToken>, backward: bool| RelationsQuery {
        rel_type: None,
        event_type: None,
        from,
        to: None,
        limit: 1,
        backward,
    };
    let parent = f.m[0].as_str();
    let mut seen = Vec::new();
    let mut from = None;
    for _ in 0..5 {
        let body = service.rooms().relations(&alice_id, &room, parent, page(from, true)).await.unwrap();
        seen.extend(ids(&body["chunk"]));
        match body["next_batch"].as_str() {
            Some(next) => from = token(next),
            None => break,
        }
    }
    assert_eq!(seen, ids_of(&[&high, &low]), "newest by depth first, not by arrival");
    let forward =
        service.rooms().relations(&alice_id, &room, parent, RelationsQuery { limit: 10, ..page(None, false) });
    assert_eq!(ids(&forward.await.unwrap()["chunk"]), ids_of(&[&low, &high]));
}

#[tokio::test]
async fn a_backward_page_stops_at_a_recorded_gap_and_says_where() {
    let (service, kv) = service();
    let f = fork(&service).await;
    let (alice, room) = who(ALICE);
    let all = EventFilter::default();
    // Record bob's join as missing: x and m1 cite it.
    let bob = f.setup[4].clone();
    let mut batch = WriteBatch::new();
    batch.put(Table::BackwardExtremities, keys::backward_extremity(ROOM, bob.as_str()), Vec::new());
    kv.write(batch).await.unwrap();

    let page = service.rooms().messages(&alice, &room, (None, None), true, 100, &all).await.unwrap();
    assert_eq!(ids(&page.response["chunk"]), ids_of(&[&f.merge, &f.m[3], &f.m[2], &f.m[1], &f.x]));
    let gap = page.gap.expect("the page reached x, which cites a missing event");
    assert_eq!(gap.missing, [bob.to_string()]);
    assert_eq!(page.response["end"].as_str(), Some(gap.token.as_str()));

    // Paging on from the gap's token goes below x, to m1, the next event that cites the gap.
    let next = service.rooms().messages(&alice, &room, (token(&gap.token), None), true, 100, &all).await.unwrap();
    assert_eq!(ids(&next.response["chunk"]), ids_of(&[&f.m[0]]));
    assert_eq!(next.gap.map(|g| g.missing), Some(vec![bob.to_string()]));

    // Forward pages and rooms without gaps report none.
    let forward = service.rooms().messages(&alice, &room, (None, None), false, 100, &all).await.unwrap();
    assert!(forward.gap.is_none());
    assert_eq!(ids(&forward.response["chunk"]).len(), 11);
}

#[tokio::test]
async fn a_gap_the_last_page_could_not_fill_is_reported_by_the_next() {
    let (service, kv) = service();
    let f = fork(&service).await;
    let (alice, room) = who(ALICE);
    let all = EventFilter::default();
    // Record m2 as missing: only m3 cites it.
    let mut batch = WriteBatch::new();
    batch.put(Table::BackwardExtremities, keys::backward_extremity(ROOM, f.m[1].as_str()), Vec::new());
    kv.write(batch).await.unwrap();

    let page = service.rooms().messages(&alice, &room, (None, None), true, 100, &all).await.unwrap();
    assert_eq!(ids(&page.response["chunk"]), ids_of(&[&f.merge, &f.m[3], &f.m[2]]));
    let gap = page.gap.expect("m3 cites the gap");
    assert_eq!(gap.missing, [f.m[1].to_string()]);

    // Nothing filled it (the other server did not answer): the next page, which holds no event
    // citing m2, still reports it, so the history below m3 is not skipped.
    let next = service.rooms().messages(&alice, &room, (token(&gap.token), None), true, 100, &all).await.unwrap();
    assert_eq!(ids(&next.response["chunk"]).first(), Some(&f.m[1].to_string()));
    assert_eq!(next.gap.map(|g| g.missing), Some(vec![f.m[1].to_string()]));
}
