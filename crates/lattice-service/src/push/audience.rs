//! Who among a room's local members push rules must look at one by one for an event, and who
//! can share one evaluation.
//!
//! The server-default ruleset of one user differs from another's only where it names the user,
//! by their ID: `.m.rule.invite_for_me` on a member event's `state_key` and
//! `.m.rule.is_user_mention` on `m.mentions.user_ids` (ruma's defaults follow the spec's
//! intentional mentions; the legacy display-name and localpart rules are not among them, and a
//! unit test fails if an upgrade brings back any rule naming the user). For an event that names
//! no member those ways, every member with the default rules gets the same actions, so in a room
//! of 10,000 members a message costs one evaluation and one shared row instead of 10,000 of
//! each. Everyone else is evaluated on their own: members who changed their rules (a keyword or
//! display-name rule among them), have pushers (each gets its pushes) or ignore anyone; and, per
//! event, each member it names.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::Value;

use super::Push;
use super::notify::Recipient;
use crate::ServiceError;

/// The caches whose changes may move a member between shared and individual evaluation: the
/// generations of the rules, pushers and ignored-users caches when an audience was gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    rules: u64,
    pushers: u64,
    ignored: u64,
}

/// A room's local joined members at one state group, sorted for push evaluation.
pub(super) struct Audience {
    state_group: u64,
    stamp: Stamp,
    pub recipients: Vec<Recipient>,
    /// Evaluated for every event (see the module comment).
    individual: Vec<usize>,
    /// Lowercased user ID → recipient: who a mention or a member event's state key names
    /// (lowercased as ruma's glob match of `invite_for_me` is; a superset of the exact match).
    by_user: HashMap<String, usize>,
}

impl Audience {
    /// The members to evaluate on their own for `event` (its JSON): the individual ones and
    /// those the event may name. Their indices into `recipients`.
    pub fn named_by(&self, event: &Value) -> BTreeSet<usize> {
        let mut named: BTreeSet<usize> = self.individual.iter().copied().collect();
        let mentioned = event["content"]["m.mentions"]["user_ids"].as_array().into_iter().flatten();
        let state_key = event.get("state_key").into_iter();
        for user in mentioned.chain(state_key).filter_map(Value::as_str) {
            named.extend(self.by_user.get(&user.to_lowercase()).copied());
        }
        named
    }
}

/// The rooms' audiences, each valid for its state group and stamp (checked on every read, so
/// nothing is forgotten by hand).
pub(super) type AudienceCache = crate::user_cache::KeyedCache<OwnedRoomId, Audience, MAX_ROOMS_WITH_AUDIENCES>;

/// At most this many rooms' audiences are kept; past it an arbitrary room's makes way.
const MAX_ROOMS_WITH_AUDIENCES: usize = 10_000;

impl Push {
    fn stamp(&self) -> Stamp {
        Stamp {
            rules: self.rules_cache.generation(),
            pushers: self.pushers_cache.generation(),
            ignored: self.account_data.ignored_users_generation(),
        }
    }

    /// The room's audience at `state_group` (whose members are `recipients`): cached until the
    /// room's state or anyone's rules, pushers or ignored users change. Gathering reads each
    /// member's cached rules, pushers and ignored users once.
    pub(super) async fn audience(
        &self,
        room_id: &RoomId,
        state_group: u64,
        recipients: &[Recipient],
    ) -> Result<Arc<Audience>, ServiceError> {
        // Taken before reading: a change meanwhile leaves a stale stamp, gathered again next time.
        let stamp = self.stamp();
        let cached = self.audiences.get(room_id);
        if let Some(audience) = cached.filter(|audience| audience.state_group == state_group && audience.stamp == stamp)
        {
            return Ok(audience);
        }
        let mut individual = Vec::new();
        let mut by_user = HashMap::with_capacity(recipients.len());
        for (index, recipient) in recipients.iter().enumerate() {
            by_user.insert(recipient.user_id.as_str().to_lowercase(), index);
            if !self.shares_evaluation(&recipient.user_id).await? {
                individual.push(index);
            }
        }
        let audience = Arc::new(Audience { state_group, stamp, recipients: recipients.to_vec(), individual, by_user });
        // Nothing forgets an audience (each is checked against its state group and stamp when
        // read), so the insert need not wait for an unchanged generation.
        self.audiences.insert_if_unchanged(room_id, audience.clone(), self.audiences.generation());
        Ok(audience)
    }

    /// Whether the user's outcome for an event that does not name them is the shared one: they
    /// have the default rules, no pusher and ignore nobody.
    async fn shares_evaluation(&self, user_id: &UserId) -> Result<bool, ServiceError> {
        Ok(self.cached_rules(user_id).await?.is_default
            && self.cached_pushers(user_id).await?.is_empty()
            && self.account_data.ignored_users(user_id).await?.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ruma::push::Ruleset;
    use ruma::user_id;

    /// The rules of the server default that differ between two users are exactly the ones the
    /// audience looks for (by their ID), and none matches a display name. A ruma upgrade that
    /// adds a rule naming the user fails here instead of notifying wrongly.
    #[test]
    fn the_default_rules_name_the_user_only_where_the_audience_looks() {
        let one = serde_json::to_value(Ruleset::server_default(user_id!("@probe_one:one.test"))).unwrap();
        let two = serde_json::to_value(Ruleset::server_default(user_id!("@probe_two:two.test"))).unwrap();
        let mut differing = BTreeSet::new();
        let mut by_display_name = BTreeSet::new();
        for kind in ["override", "content", "room", "sender", "underride"] {
            // Kinds without default rules are left out.
            let rules = |ruleset: &serde_json::Value| ruleset[kind].as_array().cloned().unwrap_or_default();
            let (rules_one, rules_two) = (rules(&one), rules(&two));
            assert_eq!(rules_one.len(), rules_two.len());
            for (rule_one, rule_two) in rules_one.iter().zip(&rules_two) {
                let id = rule_one["rule_id"].as_str().unwrap().to_owned();
                if rule_one != rule_two {
                    differing.insert(id.clone());
                }
                if rule_one.to_string().contains("contains_display_name") {
                    by_display_name.insert(id);
                }
            }
        }
        let expected: BTreeSet<String> = [".m.rule.invite_for_me", ".m.rule.is_user_mention"].map(str::to_owned).into();
        assert_eq!(differing, expected);
        assert_eq!(by_display_name, BTreeSet::new());
        // And where they name the user, it is through the fields the audience reads, and nowhere
        // else (not by localpart).
        let rules = one.to_string();
        assert!(rules.contains(r#""key":"state_key","kind":"event_match","pattern":"@probe_one:one.test""#), "{rules}");
        assert!(rules.contains(r#""key":"content.m\\.mentions.user_ids""#), "{rules}");
        assert_eq!(rules.matches("probe_one").count(), 2, "{rules}");
    }
}
