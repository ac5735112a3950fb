//! Auth-rule and state-resolution scenarios on forked room graphs, across room versions.

use lattice_core::auth::{self, AuthError};
use lattice_core::room_builder::RoomBuilder;
use lattice_core::state_resolution::{self, StateMap, StateResolutionError};

use ruma::OwnedEventId;
use ruma::events::StateEventType;
use serde_json::{Value, json};

const ALICE: &str = "@alice:hs.test";
const BOB: &str = "@bob:hs.test";
const CAROL: &str = "@carol:hs.test";

/// A public room: alice created it and holds power; bob and carol joined.
struct Room {
    b: RoomBuilder,
    create: OwnedEventId,
    alice: OwnedEventId,
    power: OwnedEventId,
    rules: OwnedEventId,
    bob: OwnedEventId,
    carol: OwnedEventId,
    tip: OwnedEventId,
}

impl Room {
    /// `auth` as the version wants it: v12 leaves the create event out of `auth_events`.
    fn auth<'a>(&'a self, ids: &[&'a OwnedEventId]) -> Vec<&'a OwnedEventId> {
        let omit_create = self.b.version().rules().authorization.room_create_event_id_as_room_id;
        ids.iter().copied().filter(|id| !(omit_create && **id == self.create)).collect()
    }

    fn add(
        &mut self,
        sender: &str,
        kind: &str,
        key: Option<&str>,
        content: Value,
        prev: &[&OwnedEventId],
        auth: &[&OwnedEventId],
    ) -> OwnedEventId {
        let auth: Vec<OwnedEventId> = self.auth(auth).into_iter().cloned().collect();
        let auth: Vec<&OwnedEventId> = auth.iter().collect();
        self.b.event(sender, kind, key, content, prev, &auth)
    }

    fn add_redaction(
        &mut self,
        sender: &str,
        target: &OwnedEventId,
        prev: &[&OwnedEventId],
        auth: &[&OwnedEventId],
    ) -> OwnedEventId {
        let auth: Vec<OwnedEventId> = self.auth(auth).into_iter().cloned().collect();
        let auth: Vec<&OwnedEventId> = auth.iter().collect();
        self.b.redaction(sender, target, prev, &auth)
    }

    /// Power levels giving `users` their levels (the creator's own entry is left out in v12,
    /// where creators stand above power levels).
    fn power_content(&self, users: &[(&str, i64)]) -> Value {
        let creators_privileged = self.b.version().rules().authorization.explicitly_privilege_room_creators;
        let mut map = serde_json::Map::new();
        for (user, level) in users {
            if !(creators_privileged && *user == ALICE) {
                map.insert((*user).to_owned(), json!(level));
            }
        }
        json!({ "users": map, "kick": 50, "ban": 50, "state_default": 50, "events_default": 0 })
    }

    fn new(version: &str) -> Self {
        let mut b = RoomBuilder::new(version);
        let create = b.create(ALICE);
        let mut room = Room {
            b,
            create: create.clone(),
            alice: create.clone(),
            power: create.clone(),
            rules: create.clone(),
            bob: create.clone(),
            carol: create.clone(),
            tip: create.clone(),
        };
        room.alice =
            room.add(ALICE, "m.room.member", Some(ALICE), json!({ "membership": "join" }), &[&create], &[&create]);
        let power = room.power_content(&[(ALICE, 100), (BOB, 50)]);
        let alice = room.alice.clone();
        room.power = room.add(ALICE, "m.room.power_levels", Some(""), power, &[&alice], &[&create, &alice]);
        let power = room.power.clone();
        room.rules = room.add(
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "public" }),
            &[&power],
            &[&create, &alice, &power],
        );
        let rules = room.rules.clone();
        room.bob = room.add(
            BOB,
            "m.room.member",
            Some(BOB),
            json!({ "membership": "join" }),
            &[&rules],
            &[&create, &power, &rules],
        );
        let bob = room.bob.clone();
        room.carol = room.add(
            CAROL,
            "m.room.member",
            Some(CAROL),
            json!({ "membership": "join" }),
            &[&bob],
            &[&create, &power, &rules],
        );
        room.tip = room.carol.clone();
        room
    }

    fn state(&self, extra: &[&OwnedEventId]) -> StateMap {
        let mut state = StateMap::new();
        for id in [&self.create, &self.alice, &self.power, &self.rules, &self.bob, &self.carol]
            .into_iter()
            .chain(extra.iter().copied())
        {
            let event = self.b.get(id).unwrap();
            let key = ruma::state_res::Event::state_key(event).unwrap().to_owned();
            state.insert((StateEventType::from(event.kind().to_string()), key), id.clone());
        }
        state
    }

    fn resolve(&self, sets: &[StateMap]) -> Result<StateMap, StateResolutionError> {
        state_resolution::resolve(self.b.version(), sets, |id| self.b.get(id))
    }

    fn member(state: &StateMap, user: &str) -> Option<OwnedEventId> {
        state.get(&(StateEventType::RoomMember, user.to_owned())).cloned()
    }
}

const VERSIONS: &[&str] = &["3", "6", "10", "11", "12"];
/// Versions whose state resolution orders by power (v2+) and also room version 1 (v1 algorithm).
const ALL_ALGORITHMS: &[&str] = &["1", "2", "3", "6", "10", "11", "12"];

#[test]
fn auth_rules_accept_the_room_and_refuse_forbidden_events() {
    for version in VERSIONS {
        let mut room = Room::new(version);
        let fetch = |id: &ruma::EventId| room.b.get(id);
        for id in [&room.alice, &room.power, &room.rules, &room.bob, &room.carol] {
            auth::check_against_auth_events(room.b.get(id).unwrap(), room.b.version(), fetch)
                .unwrap_or_else(|e| panic!("v{version}: {e}"));
        }
        let (create, power, rules, carol, bob, tip) = (
            room.create.clone(),
            room.power.clone(),
            room.rules.clone(),
            room.carol.clone(),
            room.bob.clone(),
            room.tip.clone(),
        );
        // carol (level 0) may not kick bob (kick needs 50).
        let kick = room.add(
            CAROL,
            "m.room.member",
            Some(BOB),
            json!({ "membership": "leave" }),
            &[&tip],
            &[&create, &power, &carol, &bob],
        );
        let err = auth::check_against_auth_events(room.b.get(&kick).unwrap(), room.b.version(), |id| room.b.get(id))
            .unwrap_err();
        assert!(matches!(err, AuthError::AuthEvents(_)), "v{version}: {err}");
        // bob (50) may not change power levels (state_default 50 allows, but not raising someone above himself).
        let power_grab = room.power_content(&[(ALICE, 100), (BOB, 100)]);
        let grab = room.add(BOB, "m.room.power_levels", Some(""), power_grab, &[&tip], &[&create, &power, &bob]);
        assert!(
            auth::check_against_auth_events(room.b.get(&grab).unwrap(), room.b.version(), |id| room.b.get(id)).is_err(),
            "v{version}"
        );
        // An event citing the wrong auth events is refused (a join rules event is no auth event of a message... but a missing one is).
        let message =
            room.add(BOB, "m.room.message", None, json!({ "body": "hi" }), &[&tip], &[&create, &power, &bob, &rules]);
        assert!(
            auth::check_against_auth_events(room.b.get(&message).unwrap(), room.b.version(), |id| room.b.get(id))
                .is_err(),
            "v{version}: join rules are not an auth event of a message"
        );
    }
}

#[test]
fn a_ban_beats_a_concurrent_join() {
    for version in ALL_ALGORITHMS {
        let mut room = Room::new(version);
        let (create, alice, power, rules, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.rules.clone(), room.tip.clone());
        let dave = "@dave:hs.test";
        // Branch A: alice bans dave. Branch B: dave joins the public room.
        let ban = room.add(
            ALICE,
            "m.room.member",
            Some(dave),
            json!({ "membership": "ban" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let join = room.add(
            dave,
            "m.room.member",
            Some(dave),
            json!({ "membership": "join" }),
            &[&tip],
            &[&create, &power, &rules],
        );
        let resolved = room.resolve(&[room.state(&[&ban]), room.state(&[&join])]).unwrap();
        assert_eq!(Room::member(&resolved, dave), Some(ban), "room version {version}");
    }
}

#[test]
fn a_demotion_beats_a_concurrent_kick_by_the_demoted() {
    for version in ALL_ALGORITHMS {
        let mut room = Room::new(version);
        let (create, alice, power, bob, carol, tip) = (
            room.create.clone(),
            room.alice.clone(),
            room.power.clone(),
            room.bob.clone(),
            room.carol.clone(),
            room.tip.clone(),
        );
        // Branch A: alice demotes bob to 0. Branch B: bob (still 50 there) kicks carol.
        let demoted = room.power_content(&[(ALICE, 100), (BOB, 0)]);
        let demotion = room.add(ALICE, "m.room.power_levels", Some(""), demoted, &[&tip], &[&create, &power, &alice]);
        let kick = room.add(
            BOB,
            "m.room.member",
            Some(CAROL),
            json!({ "membership": "leave" }),
            &[&tip],
            &[&create, &power, &bob, &carol],
        );
        let resolved = room.resolve(&[room.state(&[&demotion]), room.state(&[&kick])]).unwrap();
        assert_eq!(resolved[&(StateEventType::RoomPowerLevels, String::new())], demotion, "v{version}");
        assert_eq!(Room::member(&resolved, CAROL), Some(carol), "v{version}: the kick no longer passes auth");
    }
}

#[test]
fn closing_the_room_beats_a_concurrent_join() {
    for version in VERSIONS {
        let mut room = Room::new(version);
        let (create, alice, power, rules, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.rules.clone(), room.tip.clone());
        let erin = "@erin:hs.test";
        let closed = room.add(
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "invite" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let join = room.add(
            erin,
            "m.room.member",
            Some(erin),
            json!({ "membership": "join" }),
            &[&tip],
            &[&create, &power, &rules],
        );
        let resolved = room.resolve(&[room.state(&[&closed]), room.state(&[&join])]).unwrap();
        assert_eq!(resolved[&(StateEventType::RoomJoinRules, String::new())], closed, "v{version}");
        assert_eq!(Room::member(&resolved, erin), None, "v{version}: erin's join is not allowed by invite-only rules");
    }
}

#[test]
fn unconflicted_state_passes_through() {
    for version in ALL_ALGORITHMS {
        let room = Room::new(version);
        let state = room.state(&[]);
        assert_eq!(room.resolve(&[state.clone(), state.clone()]).unwrap(), state, "v{version}");
    }
}

/// Room version 1 keeps a key that only one side has (v2 runs it through auth): the reason v2
/// exists. Both behaviours are pinned here.
#[test]
fn a_join_only_one_side_saw_survives_in_v1_but_not_in_v2() {
    for (version, survives) in [("1", true), ("2", false)] {
        let mut room = Room::new(version);
        let (create, alice, power, rules, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.rules.clone(), room.tip.clone());
        let erin = "@erin:hs.test";
        let closed = room.add(
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "invite" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let join = room.add(
            erin,
            "m.room.member",
            Some(erin),
            json!({ "membership": "join" }),
            &[&tip],
            &[&create, &power, &rules],
        );
        let resolved = room.resolve(&[room.state(&[&closed]), room.state(&[&join])]).unwrap();
        assert_eq!(resolved[&(StateEventType::RoomJoinRules, String::new())], closed, "v{version}");
        assert_eq!(Room::member(&resolved, erin).is_some(), survives, "v{version}");
    }
}

// ---- One auth-rule family at a time, accept and reject, across room versions ----

/// Whether `id` passes the checks against its auth events.
fn allowed(room: &Room, id: &OwnedEventId) -> Result<(), AuthError> {
    auth::check_against_auth_events(room.b.get(id).unwrap(), room.b.version(), |id| room.b.get(id))
}

#[test]
fn create_events() {
    for version in ["3", "10", "11"] {
        let room = Room::new(version);
        allowed(&room, &room.create).unwrap();
        let mut b = RoomBuilder::new(version);
        let first = b.create(ALICE);
        // A create event with prev_events, or a second one, is refused.
        let content = json!({ "room_version": version, "creator": ALICE });
        let second = b.event(ALICE, "m.room.create", Some(""), content, &[&first], &[]);
        let err = auth::check_against_auth_events(b.get(&second).unwrap(), b.version(), |id| b.get(id));
        assert!(err.is_err(), "v{version}: a create event with prev_events");
    }
    // Before v12 the room ID's server must be the creator's.
    let mut b = RoomBuilder::new("10");
    let foreign = b.event(
        "@mallory:other.test",
        "m.room.create",
        Some(""),
        json!({ "room_version": "10", "creator": "@mallory:other.test" }),
        &[],
        &[],
    );
    assert!(auth::check_against_auth_events(b.get(&foreign).unwrap(), b.version(), |id| b.get(id)).is_err());
}

#[test]
fn membership_transitions() {
    for version in ["3", "7", "10", "11", "12"] {
        let mut room = Room::new(version);
        let (create, alice, power, rules, bob, tip) = (
            room.create.clone(),
            room.alice.clone(),
            room.power.clone(),
            room.rules.clone(),
            room.bob.clone(),
            room.tip.clone(),
        );
        let frank = "@frank:hs.test";
        // Invite-only rules: frank cannot join uninvited; an invite by bob lets him in.
        let closed = room.add(
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "invite" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let uninvited = room.add(
            frank,
            "m.room.member",
            Some(frank),
            json!({ "membership": "join" }),
            &[&closed],
            &[&create, &power, &closed],
        );
        assert!(allowed(&room, &uninvited).is_err(), "v{version}: uninvited join");
        let invite = room.add(
            BOB,
            "m.room.member",
            Some(frank),
            json!({ "membership": "invite" }),
            &[&closed],
            &[&create, &power, &bob, &closed],
        );
        allowed(&room, &invite).unwrap_or_else(|e| panic!("v{version}: invite: {e}"));
        let join = room.add(
            frank,
            "m.room.member",
            Some(frank),
            json!({ "membership": "join" }),
            &[&invite],
            &[&create, &power, &closed, &invite],
        );
        allowed(&room, &join).unwrap_or_else(|e| panic!("v{version}: invited join: {e}"));
        // A banned user cannot join even a public room.
        let gus = "@gus:hs.test";
        let ban = room.add(
            ALICE,
            "m.room.member",
            Some(gus),
            json!({ "membership": "ban" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let banned_join = room.add(
            gus,
            "m.room.member",
            Some(gus),
            json!({ "membership": "join" }),
            &[&ban],
            &[&create, &power, &rules, &ban],
        );
        assert!(allowed(&room, &banned_join).is_err(), "v{version}: banned join");
        // Nobody may set someone else's membership to join.
        let forced = room.add(
            ALICE,
            "m.room.member",
            Some(gus),
            json!({ "membership": "join" }),
            &[&tip],
            &[&create, &power, &alice, &rules],
        );
        assert!(allowed(&room, &forced).is_err(), "v{version}: joining someone else");
    }
}

#[test]
fn knocking_exists_from_room_version_7() {
    for (version, knock_allowed) in [("6", false), ("7", true), ("10", true), ("12", true)] {
        let mut room = Room::new(version);
        let (create, alice, power, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.tip.clone());
        let knockable = room.add(
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "knock" }),
            &[&tip],
            &[&create, &power, &alice],
        );
        let hank = "@hank:hs.test";
        let knock = room.add(
            hank,
            "m.room.member",
            Some(hank),
            json!({ "membership": "knock" }),
            &[&knockable],
            &[&create, &power, &knockable],
        );
        assert_eq!(allowed(&room, &knock).is_ok(), knock_allowed, "v{version}");
    }
}

#[test]
fn restricted_joins_exist_from_room_version_8() {
    for (version, supported) in [("7", false), ("8", true), ("10", true), ("11", true)] {
        let mut room = Room::new(version);
        let (create, alice, power, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.tip.clone());
        let rule = json!({ "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": "!space:hs.test" }] });
        let restricted = room.add(ALICE, "m.room.join_rules", Some(""), rule, &[&tip], &[&create, &power, &alice]);
        let ivy = "@ivy:hs.test";
        // Vouched for by alice, who can invite: allowed where restricted rooms exist.
        let vouched = json!({ "membership": "join", "join_authorised_via_users_server": ALICE });
        let join =
            room.add(ivy, "m.room.member", Some(ivy), vouched, &[&restricted], &[&create, &power, &restricted, &alice]);
        assert_eq!(allowed(&room, &join).is_ok(), supported, "v{version}: vouched join");
        // Without anyone vouching, never.
        let unvouched = room.add(
            ivy,
            "m.room.member",
            Some(ivy),
            json!({ "membership": "join" }),
            &[&restricted],
            &[&create, &power, &restricted],
        );
        assert!(allowed(&room, &unvouched).is_err(), "v{version}: unvouched join");
    }
}

#[test]
fn power_levels_are_integers_from_room_version_10() {
    for (version, strings_allowed) in [("9", true), ("10", false), ("11", false)] {
        let mut room = Room::new(version);
        let (create, alice, power, tip) =
            (room.create.clone(), room.alice.clone(), room.power.clone(), room.tip.clone());
        let content = json!({ "users": { ALICE: 100, BOB: "50" }, "kick": 50, "ban": 50, "state_default": 50 });
        let stringly = room.add(ALICE, "m.room.power_levels", Some(""), content, &[&tip], &[&create, &power, &alice]);
        assert_eq!(allowed(&room, &stringly).is_ok(), strings_allowed, "v{version}");
    }
}

#[test]
fn events_need_their_sender_joined_and_the_level_for_their_type() {
    for version in VERSIONS {
        let mut room = Room::new(version);
        let (create, power, bob, carol, tip) =
            (room.create.clone(), room.power.clone(), room.bob.clone(), room.carol.clone(), room.tip.clone());
        let message = room.add(BOB, "m.room.message", None, json!({ "body": "hi" }), &[&tip], &[&create, &power, &bob]);
        allowed(&room, &message).unwrap_or_else(|e| panic!("v{version}: {e}"));
        let stranger = "@stranger:hs.test";
        let outside = room.add(stranger, "m.room.message", None, json!({ "body": "hi" }), &[&tip], &[&create, &power]);
        assert!(allowed(&room, &outside).is_err(), "v{version}: a non-member's message");
        // carol (0) may not set state needing state_default 50.
        let topic =
            room.add(CAROL, "m.room.topic", Some(""), json!({ "topic": "mine" }), &[&tip], &[&create, &power, &carol]);
        assert!(allowed(&room, &topic).is_err(), "v{version}: topic below state_default");
        let by_bob =
            room.add(BOB, "m.room.topic", Some(""), json!({ "topic": "ours" }), &[&tip], &[&create, &power, &bob]);
        allowed(&room, &by_bob).unwrap_or_else(|e| panic!("v{version}: {e}"));
    }
}

#[test]
fn redactions_need_the_redact_level_or_the_same_server() {
    for version in ["3", "10", "11"] {
        let mut room = Room::new(version);
        let (create, alice, power, bob, carol, tip) = (
            room.create.clone(),
            room.alice.clone(),
            room.power.clone(),
            room.bob.clone(),
            room.carol.clone(),
            room.tip.clone(),
        );
        let message =
            room.add(CAROL, "m.room.message", None, json!({ "body": "oops" }), &[&tip], &[&create, &power, &carol]);
        let by_alice = room.add_redaction(ALICE, &message, &[&message], &[&create, &power, &alice]);
        allowed(&room, &by_alice).unwrap_or_else(|e| panic!("v{version}: {e}"));
        let by_bob = room.add_redaction(BOB, &message, &[&message], &[&create, &power, &bob]);
        // bob (50) reaches the default redact level (50) too.
        allowed(&room, &by_bob).unwrap_or_else(|e| panic!("v{version}: {e}"));
    }
}

#[test]
fn third_party_invites_need_a_matching_invite_event() {
    for version in ["3", "10", "11"] {
        let mut room = Room::new(version);
        let (create, power, bob, tip) = (room.create.clone(), room.power.clone(), room.bob.clone(), room.tip.clone());
        let jo = "@jo:hs.test";
        let signed =
            json!({ "mxid": jo, "token": "no-such-token", "signatures": { "id.test": { "ed25519:0": "c2ln" } } });
        let content =
            json!({ "membership": "invite", "third_party_invite": { "display_name": "jo", "signed": signed } });
        let invite = room.add(BOB, "m.room.member", Some(jo), content, &[&tip], &[&create, &power, &bob]);
        assert!(allowed(&room, &invite).is_err(), "v{version}: no m.room.third_party_invite with that token");
    }
}
