//! Presence (spec "Presence"): a user's state and the rules that move it — what a `/sync`, a
//! `PUT /presence` and the passing of time each change. Pure: the presence service keeps the
//! states in memory and asks these rules what a moment does to them.

/// `presence` of an `m.presence` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PresenceState {
    Online,
    Unavailable,
    Offline,
}

impl PresenceState {
    /// The spec's three values; anything else is `None` (the caller refuses it).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "online" => Some(Self::Online),
            "unavailable" => Some(Self::Unavailable),
            "offline" => Some(Self::Offline),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Unavailable => "unavailable",
            Self::Offline => "offline",
        }
    }
}

/// How long without activity, syncs or news moves a user on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceTimeouts {
    /// An `online` user whose last activity is older than this shows as `unavailable`.
    pub idle_ms: u64,
    /// A local user with no `/sync` running and none finished for this long goes `offline`.
    pub offline_ms: u64,
    /// A user of another server with no update for this long goes `offline` (their server
    /// repeats the state of users who stay online more often than this).
    pub remote_ms: u64,
}

/// What others see of a user, and whether the user chose it themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPresence {
    pub state: PresenceState,
    pub status_msg: Option<String>,
    /// When the user last did something (ms since the epoch); 0: never seen.
    pub last_active_ts: u64,
    /// `unavailable` or `offline` set by the user through `PUT /presence`: a sync's
    /// `set_presence` does not override it. It holds until the user stops syncing long enough
    /// to go `offline` (then the next sync brings them back) or sets another state.
    pub explicit: bool,
}

impl Default for UserPresence {
    fn default() -> Self {
        Self { state: PresenceState::Offline, status_msg: None, last_active_ts: 0, explicit: false }
    }
}

impl UserPresence {
    /// `currently_active`: online and not idle (an idle user is `unavailable`).
    pub fn currently_active(&self) -> bool {
        self.state == PresenceState::Online
    }

    /// Whether `other` differs in what clients and other servers are told of a change (the
    /// state, the status message): a moved `last_active_ts` alone is not news, as the spec's
    /// `currently_active` lets a server stay quiet while the user stays active.
    pub fn differs_visibly(&self, other: &UserPresence) -> bool {
        self.state != other.state || self.status_msg != other.status_msg
    }

    /// Whether `other` differs in anything kept across restarts.
    pub fn differs_durably(&self, other: &UserPresence) -> bool {
        self.differs_visibly(other) || self.explicit != other.explicit
    }

    /// Nothing worth telling anyone: offline, with no status message.
    pub fn is_blank(&self) -> bool {
        self.state == PresenceState::Offline && self.status_msg.is_none()
    }

    /// `PUT /presence/{userId}/status` by the user: the state and the status message as given
    /// (a missing message clears it). Setting `online` is activity.
    pub fn set_by_user(&self, state: PresenceState, status_msg: Option<String>, now: u64) -> Self {
        let last_active_ts = if state == PresenceState::Online { now } else { self.last_active_ts };
        Self { state, status_msg, last_active_ts, explicit: state != PresenceState::Online }
    }

    /// A `/sync` with `set_presence`: `online` is activity and brings the user online,
    /// `unavailable` marks them idle, `offline` changes nothing. A state the user set
    /// themselves is kept (but `online` still counts as activity).
    pub fn synced(&self, set_presence: PresenceState, now: u64) -> Self {
        let mut next = self.clone();
        match set_presence {
            PresenceState::Offline => {}
            PresenceState::Online => {
                next.last_active_ts = now;
                if !self.explicit {
                    next.state = PresenceState::Online;
                }
            }
            PresenceState::Unavailable if !self.explicit => next.state = PresenceState::Unavailable,
            PresenceState::Unavailable => {}
        }
        next
    }

    /// What time does to a local user at `now`: with no sync running (`syncing` false) and
    /// none since `last_sync_ts` for the offline timeout, `offline` (the user's own choice ends
    /// there); else an `online` user idle for the idle timeout becomes `unavailable`.
    pub fn after_local_timeouts(
        &self,
        syncing: bool,
        last_sync_ts: u64,
        now: u64,
        timeouts: &PresenceTimeouts,
    ) -> Option<Self> {
        let gone = !syncing && now.saturating_sub(last_sync_ts) >= timeouts.offline_ms;
        if self.state != PresenceState::Offline && gone {
            return Some(Self { state: PresenceState::Offline, explicit: false, ..self.clone() });
        }
        let idle = now.saturating_sub(self.last_active_ts) >= timeouts.idle_ms;
        if self.state == PresenceState::Online && idle {
            return Some(Self { state: PresenceState::Unavailable, ..self.clone() });
        }
        None
    }

    /// What time does to another server's user at `now`, last heard of at `last_update_ts`.
    pub fn after_remote_timeout(&self, last_update_ts: u64, now: u64, timeouts: &PresenceTimeouts) -> Option<Self> {
        let silent = now.saturating_sub(last_update_ts) >= timeouts.remote_ms;
        (self.state != PresenceState::Offline && silent).then(|| Self { state: PresenceState::Offline, ..self.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: PresenceTimeouts = PresenceTimeouts { idle_ms: 300_000, offline_ms: 30_000, remote_ms: 1_800_000 };

    fn online_at(ts: u64) -> UserPresence {
        UserPresence::default().synced(PresenceState::Online, ts)
    }

    #[test]
    fn states_parse_only_the_spec_values() {
        for state in [PresenceState::Online, PresenceState::Unavailable, PresenceState::Offline] {
            assert_eq!(PresenceState::parse(state.as_str()), Some(state));
        }
        for bad in ["", "busy", "Online", "idle", " online"] {
            assert_eq!(PresenceState::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_sync_brings_a_user_online_and_counts_as_activity() {
        let online = online_at(1_000);
        assert_eq!(online.state, PresenceState::Online);
        assert_eq!(online.last_active_ts, 1_000);
        assert!(online.currently_active());
        assert!(online.differs_visibly(&UserPresence::default()));
        let later = online.synced(PresenceState::Online, 5_000);
        assert_eq!(later.last_active_ts, 5_000);
        assert!(!later.differs_visibly(&online), "a newer last-active time alone is no news");
        let quiet = online.synced(PresenceState::Offline, 9_000);
        assert_eq!(quiet, online, "set_presence=offline changes nothing");
        let idle = online.synced(PresenceState::Unavailable, 9_000);
        assert_eq!((idle.state, idle.last_active_ts), (PresenceState::Unavailable, 1_000));
    }

    #[test]
    fn an_online_user_goes_idle_after_the_idle_timeout() {
        let user = online_at(0);
        let syncing_until = |now| user.after_local_timeouts(true, now, now, &TIMEOUTS);
        assert_eq!(syncing_until(TIMEOUTS.idle_ms - 1), None);
        let idle = syncing_until(TIMEOUTS.idle_ms).expect("idle");
        assert_eq!(idle.state, PresenceState::Unavailable);
        assert!(!idle.currently_active());
        assert_eq!(idle.after_local_timeouts(true, TIMEOUTS.idle_ms * 2, TIMEOUTS.idle_ms * 2, &TIMEOUTS), None);
        let back = idle.synced(PresenceState::Online, TIMEOUTS.idle_ms * 3);
        assert_eq!(back.state, PresenceState::Online, "activity ends idleness");
    }

    #[test]
    fn a_user_who_stops_syncing_goes_offline_after_the_sync_timeout() {
        let user = online_at(10_000);
        let last_sync = 10_000;
        assert_eq!(user.after_local_timeouts(false, last_sync, last_sync + TIMEOUTS.offline_ms - 1, &TIMEOUTS), None);
        let gone =
            user.after_local_timeouts(false, last_sync, last_sync + TIMEOUTS.offline_ms, &TIMEOUTS).expect("gone");
        assert_eq!(gone.state, PresenceState::Offline);
        assert_eq!(gone.last_active_ts, 10_000, "the last activity is kept");
        // A long-poll that is still running keeps the user from going offline.
        let far = last_sync + TIMEOUTS.offline_ms * 5;
        assert_eq!(user.after_local_timeouts(true, last_sync, far, &TIMEOUTS), None, "still syncing, not yet idle");
        assert_eq!(gone.after_local_timeouts(false, last_sync, far, &TIMEOUTS), None, "offline stays offline");
    }

    #[test]
    fn a_state_set_by_the_user_holds_until_they_go_offline() {
        let user = online_at(0).set_by_user(PresenceState::Unavailable, Some("lunch".into()), 1_000);
        assert!(user.explicit);
        assert_eq!(user.status_msg.as_deref(), Some("lunch"));
        let synced = user.synced(PresenceState::Online, 2_000);
        assert_eq!(synced.state, PresenceState::Unavailable, "a sync does not override the user's choice");
        assert_eq!(synced.last_active_ts, 2_000, "but it is activity");
        let gone = synced.after_local_timeouts(false, 2_000, 2_000 + TIMEOUTS.offline_ms, &TIMEOUTS).expect("gone");
        assert_eq!((gone.state, gone.explicit), (PresenceState::Offline, false));
        assert_eq!(gone.status_msg.as_deref(), Some("lunch"), "the status message outlives the session");
        let back = gone.synced(PresenceState::Online, 99_000);
        assert_eq!(back.state, PresenceState::Online);
        let invisible = back.set_by_user(PresenceState::Offline, None, 100_000);
        assert_eq!(invisible.synced(PresenceState::Online, 101_000).state, PresenceState::Offline);
        assert!(invisible.differs_durably(&back) && invisible.differs_visibly(&back));
        let online_again = invisible.set_by_user(PresenceState::Online, None, 102_000);
        assert_eq!(
            (online_again.state, online_again.explicit, online_again.last_active_ts),
            (PresenceState::Online, false, 102_000)
        );
    }

    #[test]
    fn a_remote_user_goes_offline_when_their_server_falls_silent() {
        let user = online_at(0);
        assert_eq!(user.after_remote_timeout(0, TIMEOUTS.remote_ms - 1, &TIMEOUTS), None);
        let silent = user.after_remote_timeout(0, TIMEOUTS.remote_ms, &TIMEOUTS).expect("silent");
        assert_eq!(silent.state, PresenceState::Offline);
        assert_eq!(silent.after_remote_timeout(0, TIMEOUTS.remote_ms * 2, &TIMEOUTS), None);
    }
}
