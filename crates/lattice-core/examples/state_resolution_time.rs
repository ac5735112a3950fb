//! Benchmark: state resolution of a fork with 1,000 conflicting events.
//!
//! 500 members joined a public room; then the room forks, and every member key gets one
//! event on each side. Two shapes: both sides rename every member (ordinary events, sorted by
//! mainline), and one side bans every member while the other renames them (500 power events,
//! sorted by reverse topological power ordering).
//!
//! Run: `cargo run --release -p lattice-core --example state_resolution_time`

use std::time::Instant;

use lattice_core::room_builder::RoomBuilder;
use lattice_core::state_resolution::{self, StateMap};
use ruma::OwnedEventId;
use ruma::events::StateEventType;
use serde_json::json;

const MEMBERS: usize = 500;

fn key(kind: StateEventType, state_key: &str) -> (StateEventType, String) {
    (kind, state_key.to_owned())
}

fn run(version: &str, bans: bool) {
    let mut room = RoomBuilder::new(version);
    let v12 = room.version().rules().authorization.room_create_event_id_as_room_id;
    let creator = "@creator:hs.test";
    let create = room.create(creator);
    // v12 rooms name their create event in the room ID instead of in auth_events.
    let with_create = |ids: Vec<&OwnedEventId>| -> Vec<OwnedEventId> {
        let mut all = if v12 { Vec::new() } else { vec![create.clone()] };
        all.extend(ids.into_iter().cloned());
        all
    };
    let auth = with_create(vec![]);
    let creator_join = room.event(
        creator,
        "m.room.member",
        Some(creator),
        json!({ "membership": "join" }),
        &[&create],
        &auth.iter().collect::<Vec<_>>(),
    );
    let power_content = if v12 { json!({}) } else { json!({ "users": { creator: 100 } }) };
    let auth = with_create(vec![&creator_join]);
    let power = room.event(
        creator,
        "m.room.power_levels",
        Some(""),
        power_content,
        &[&creator_join],
        &auth.iter().collect::<Vec<_>>(),
    );
    let auth = with_create(vec![&creator_join, &power]);
    let rules = room.event(
        creator,
        "m.room.join_rules",
        Some(""),
        json!({ "join_rule": "public" }),
        &[&power],
        &auth.iter().collect::<Vec<_>>(),
    );

    let mut base = StateMap::new();
    base.insert(key(StateEventType::RoomCreate, ""), create.clone());
    base.insert(key(StateEventType::RoomMember, creator), creator_join.clone());
    base.insert(key(StateEventType::RoomPowerLevels, ""), power.clone());
    base.insert(key(StateEventType::RoomJoinRules, ""), rules.clone());

    let mut tip = rules.clone();
    let mut joins = Vec::new();
    for i in 0..MEMBERS {
        let user = format!("@user{i}:hs.test");
        let auth = with_create(vec![&power, &rules]);
        tip = room.event(
            &user,
            "m.room.member",
            Some(&user),
            json!({ "membership": "join" }),
            &[&tip],
            &auth.iter().collect::<Vec<_>>(),
        );
        base.insert(key(StateEventType::RoomMember, &user), tip.clone());
        joins.push((user, tip.clone()));
    }
    let fork = tip.clone();
    let mut sides = Vec::new();
    for side in ["A", "B"] {
        let mut state = base.clone();
        let mut tip = fork.clone();
        for (user, join) in &joins {
            tip = if bans && side == "A" {
                let auth = with_create(vec![&power, &creator_join, join]);
                let content = json!({ "membership": "ban" });
                room.event(creator, "m.room.member", Some(user), content, &[&tip], &auth.iter().collect::<Vec<_>>())
            } else {
                let auth = with_create(vec![&power, &rules, join]);
                let content = json!({ "membership": "join", "displayname": format!("{user} on {side}") });
                room.event(user, "m.room.member", Some(user), content, &[&tip], &auth.iter().collect::<Vec<_>>())
            };
            state.insert(key(StateEventType::RoomMember, user), tip.clone());
        }
        sides.push(state);
    }

    let start = Instant::now();
    let resolved = state_resolution::resolve(room.version(), &sides, |id| room.get(id)).expect("resolves");
    let elapsed = start.elapsed();
    assert_eq!(resolved.len(), base.len());
    if bans {
        // Every ban wins: the renames no longer pass auth once the bans are applied.
        assert!(joins.iter().all(|(user, _)| resolved[&key(StateEventType::RoomMember, user)]
            == sides[0][&key(StateEventType::RoomMember, user)]));
    }
    let shape = if bans { "bans vs renames" } else { "renames vs renames" };
    println!(
        "room version {version}, {shape}: {} conflicting events over {MEMBERS} keys resolved in {:.1} ms",
        2 * MEMBERS,
        elapsed.as_secs_f64() * 1000.0
    );
}

fn main() {
    for version in ["10", "11", "12"] {
        run(version, false);
        run(version, true);
    }
}
