//! History visibility (spec: client-server "Room History Visibility", server behaviour): whether
//! one reader may see one event, from the room's state at that event. Every path that serves an
//! event to a user — and later to another server — asks [`may_see`]; the caller only gathers the
//! facts.

/// The `history_visibility` of `m.room.history_visibility`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryVisibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl HistoryVisibility {
    /// The setting a state holds: without the event, or with a value not understood, `shared`.
    pub fn from_setting(setting: Option<&str>) -> Self {
        match setting {
            Some("world_readable") => Self::WorldReadable,
            Some("invited") => Self::Invited,
            Some("joined") => Self::Joined,
            _ => Self::Shared,
        }
    }
}

/// What the room's state said at one point, as far as one reader is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateFacts {
    pub visibility: HistoryVisibility,
    /// The reader's membership (`join`, `invite`, `leave`, …), if they had one.
    pub membership: Option<String>,
}

/// The facts about one event for one reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFacts {
    /// The state at the event.
    pub at: StateFacts,
    /// The state before the event, given when the event itself changes a fact: an
    /// `m.room.history_visibility` event, or the reader's own `m.room.member` event. The reader
    /// may then see it if either state allows.
    pub before: Option<StateFacts>,
    /// Whether the reader joined the room at some point after the event was sent.
    pub joined_later: bool,
}

/// The spec's rule: world-readable; joined at the event; `shared` and joined later; invited at
/// the event under `invited`. Anything else is hidden.
pub fn may_see(facts: &EventFacts) -> bool {
    let allows = |state: &StateFacts| match (state.visibility, state.membership.as_deref()) {
        (HistoryVisibility::WorldReadable, _) | (_, Some("join")) => true,
        (HistoryVisibility::Shared, _) => facts.joined_later,
        (HistoryVisibility::Invited, Some("invite")) => true,
        _ => false,
    };
    allows(&facts.at) || facts.before.as_ref().is_some_and(allows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HistoryVisibility::*;

    fn facts(visibility: HistoryVisibility, membership: Option<&str>, joined_later: bool) -> EventFacts {
        EventFacts {
            at: StateFacts { visibility, membership: membership.map(str::to_owned) },
            before: None,
            joined_later,
        }
    }

    #[test]
    fn world_readable_events_are_for_everyone() {
        assert!(may_see(&facts(WorldReadable, None, false)));
        assert!(may_see(&facts(WorldReadable, Some("leave"), false)));
    }

    #[test]
    fn a_member_at_the_event_sees_it_whatever_the_setting() {
        for visibility in [Shared, Invited, Joined] {
            assert!(may_see(&facts(visibility, Some("join"), false)), "{visibility:?}");
        }
    }

    #[test]
    fn shared_history_is_for_those_who_joined_after_it() {
        assert!(may_see(&facts(Shared, None, true)));
        assert!(!may_see(&facts(Shared, None, false)), "never joined");
        assert!(!may_see(&facts(Shared, Some("leave"), false)), "sent after they left");
    }

    #[test]
    fn invited_history_starts_at_the_invite() {
        assert!(may_see(&facts(Invited, Some("invite"), true)));
        assert!(!may_see(&facts(Invited, None, true)), "before the invite");
        assert!(!may_see(&facts(Shared, Some("invite"), false)), "an invitee under shared has not joined yet");
    }

    #[test]
    fn joined_history_starts_at_the_join() {
        assert!(!may_see(&facts(Joined, None, true)));
        assert!(!may_see(&facts(Joined, Some("invite"), true)));
        assert!(!may_see(&facts(Joined, Some("leave"), false)));
        assert!(!may_see(&facts(Joined, Some("ban"), false)));
    }

    #[test]
    fn a_change_is_visible_if_either_side_allows() {
        // Own leave under `joined`: after it the membership is `leave`, before it `join`.
        let leave = EventFacts {
            at: StateFacts { visibility: Joined, membership: Some("leave".into()) },
            before: Some(StateFacts { visibility: Joined, membership: Some("join".into()) }),
            joined_later: false,
        };
        assert!(may_see(&leave));
        // A switch from world_readable to joined is visible to a stranger.
        let switch = EventFacts {
            at: StateFacts { visibility: Joined, membership: None },
            before: Some(StateFacts { visibility: WorldReadable, membership: None }),
            joined_later: false,
        };
        assert!(may_see(&switch));
    }

    #[test]
    fn unknown_settings_mean_shared() {
        assert_eq!(HistoryVisibility::from_setting(None), Shared);
        assert_eq!(HistoryVisibility::from_setting(Some("everyone")), Shared);
        assert_eq!(HistoryVisibility::from_setting(Some("joined")), Joined);
    }
}
