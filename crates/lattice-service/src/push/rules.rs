//! Push rules: read as the user's `m.push_rules` account data (the server default when they
//! never changed it), changed by read-modify-write batches that are conditional on the value
//! read, so two concurrent changes never lose one another. ruma's `Ruleset` holds the rules and
//! their order and enforces the spec's rules for changes (reserved `.` IDs, `before`/`after`).

use std::sync::Arc;

use lattice_storage::StorageError;
use ruma::UserId;
use ruma::push::{Action, AnyPushRule, InsertPushRuleError, NewPushRule, RemovePushRuleError, RuleKind, Ruleset};

use super::Push;
use crate::{JsonObject, ServiceError};

/// The account-data type the rules are stored as.
pub(crate) const PUSH_RULES_TYPE: &str = "m.push_rules";

/// How often a change is tried again when another change to the same user's rules won the race.
const MAX_CHANGE_ATTEMPTS: usize = 8;

/// The five kinds of the spec; ruma's `RuleKind` also parses any other string.
pub fn is_known_kind(kind: &RuleKind) -> bool {
    matches!(kind, RuleKind::Override | RuleKind::Underride | RuleKind::Sender | RuleKind::Room | RuleKind::Content)
}

fn check_kind(kind: &RuleKind) -> Result<(), ServiceError> {
    if !is_known_kind(kind) {
        return Err(ServiceError::InvalidParam(format!("unknown push rule kind {kind}")));
    }
    Ok(())
}

/// `m.push_rules` content for a user who never changed their rules: the spec's default rules.
pub fn default_rules_content(user_id: &UserId) -> JsonObject {
    content_of(&Ruleset::server_default(user_id))
}

fn content_of(ruleset: &Ruleset) -> JsonObject {
    // A `Ruleset` is plain data: it always serialises (to an object).
    let global = serde_json::to_value(ruleset).unwrap_or_default();
    JsonObject([("global".to_owned(), global)].into())
}

/// The ruleset in stored `m.push_rules` content. The server alone writes it, so content that no
/// longer reads (written by another version) falls back to the defaults rather than failing
/// every request of that user.
fn ruleset_of(user_id: &UserId, content: &JsonObject) -> Ruleset {
    let global = content.0.get("global").cloned().unwrap_or_default();
    serde_json::from_value(global).unwrap_or_else(|error| {
        tracing::warn!(user = %user_id, %error, "stored push rules do not parse; using the defaults");
        Ruleset::server_default(user_id)
    })
}

/// Parsed rulesets by user, so evaluating an event for a member costs no account-data read and
/// no parse. Only [`Push::change`] writes `m.push_rules` (clients cannot: it is server-managed
/// account data), and it drops the user's entry after every write.
pub(super) type RulesCache = crate::user_cache::UserCache<UserRules>;

/// A user's ruleset as evaluated, and whether it is the server default for them (never changed,
/// or changed back): then it differs from every other default ruleset only in the user's own ID,
/// localpart and display name, and one evaluation serves all such members (`audience.rs`).
pub(super) struct UserRules {
    pub ruleset: Ruleset,
    pub is_default: bool,
}

impl UserRules {
    fn of(user_id: &UserId, stored: Option<&JsonObject>) -> Self {
        let default = Ruleset::server_default(user_id);
        match stored {
            None => UserRules { ruleset: default, is_default: true },
            Some(content) => {
                let ruleset = ruleset_of(user_id, content);
                let is_default = serde_json::to_value(&ruleset).ok() == serde_json::to_value(&default).ok();
                UserRules { ruleset, is_default }
            }
        }
    }
}

fn not_found(kind: &RuleKind, rule_id: &str) -> ServiceError {
    ServiceError::NotFound(format!("no push rule {kind}/{rule_id}"))
}

impl Push {
    /// The user's whole ruleset: theirs as stored, or the server default.
    pub async fn rules(&self, user_id: &UserId) -> Result<Ruleset, ServiceError> {
        Ok(match self.account_data.stored_global(user_id, PUSH_RULES_TYPE).await? {
            Some((content, _)) => ruleset_of(user_id, &content),
            None => Ruleset::server_default(user_id),
        })
    }

    /// The user's ruleset for evaluating events: from the cache, else read and cached.
    pub(super) async fn cached_rules(&self, user_id: &UserId) -> Result<Arc<UserRules>, ServiceError> {
        self.rules_cache.get_or_load(user_id, self.user_rules(user_id)).await
    }

    async fn user_rules(&self, user_id: &UserId) -> Result<UserRules, ServiceError> {
        let stored = self.account_data.stored_global(user_id, PUSH_RULES_TYPE).await?;
        Ok(UserRules::of(user_id, stored.as_ref().map(|(content, _)| content)))
    }

    /// One rule, or `M_NOT_FOUND`.
    pub async fn rule(&self, user_id: &UserId, kind: &RuleKind, rule_id: &str) -> Result<AnyPushRule, ServiceError> {
        check_kind(kind)?;
        let rules = self.rules(user_id).await?;
        let rule = rules.get(kind.clone(), rule_id).ok_or_else(|| not_found(kind, rule_id))?;
        Ok(rule.to_owned())
    }

    /// `PUT /pushrules/global/{kind}/{ruleId}`: adds or replaces a user rule, placed by
    /// `before`/`after` (ruma's rules: not relative to a server-default rule, `before` below
    /// `after`), keeping a replaced rule's `enabled`.
    pub async fn set_rule(
        &self,
        user_id: &UserId,
        rule: NewPushRule,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<(), ServiceError> {
        let rule_id = rule.rule_id().to_owned();
        self.change(user_id, |rules| {
            rules.insert(rule.clone(), after, before).map_err(|error| match error {
                InsertPushRuleError::UnknownRuleId => {
                    ServiceError::NotFound(format!("the before/after rule of {rule_id} does not exist"))
                }
                other => ServiceError::InvalidParam(other.to_string()),
            })
        })
        .await
    }

    /// `DELETE /pushrules/global/{kind}/{ruleId}`: server-default rules stay.
    pub async fn delete_rule(&self, user_id: &UserId, kind: &RuleKind, rule_id: &str) -> Result<(), ServiceError> {
        check_kind(kind)?;
        self.change(user_id, |rules| {
            rules.remove(kind.clone(), rule_id).map_err(|error| match error {
                RemovePushRuleError::ServerDefault => {
                    ServiceError::InvalidParam(format!("{rule_id} is a server-default rule and cannot be deleted"))
                }
                _ => not_found(kind, rule_id),
            })
        })
        .await
    }

    pub async fn set_enabled(
        &self,
        user_id: &UserId,
        kind: &RuleKind,
        rule_id: &str,
        enabled: bool,
    ) -> Result<(), ServiceError> {
        check_kind(kind)?;
        self.change(user_id, |rules| {
            rules.set_enabled(kind.clone(), rule_id, enabled).map_err(|_| not_found(kind, rule_id))
        })
        .await
    }

    pub async fn set_actions(
        &self,
        user_id: &UserId,
        kind: &RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<(), ServiceError> {
        check_kind(kind)?;
        self.change(user_id, |rules| {
            rules.set_actions(kind.clone(), rule_id, actions.clone()).map_err(|_| not_found(kind, rule_id))
        })
        .await
    }

    /// Reads the rules, applies `edit`, and writes them back as account data, conditional on the
    /// stored value being the one read; a lost race reads again.
    async fn change(
        &self,
        user_id: &UserId,
        mut edit: impl FnMut(&mut Ruleset) -> Result<(), ServiceError>,
    ) -> Result<(), ServiceError> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let stored = self.account_data.stored_global(user_id, PUSH_RULES_TYPE).await?;
            let (mut rules, expected) = match stored {
                Some((content, raw)) => (ruleset_of(user_id, &content), Some(raw)),
                None => (Ruleset::server_default(user_id), None),
            };
            edit(&mut rules)?;
            let content = content_of(&rules);
            let written =
                self.account_data.write_account_data_if(user_id, None, PUSH_RULES_TYPE, content, Some(expected)).await;
            // Whatever the outcome (a failed write may still have reached the store), the next
            // evaluation reads the rules again.
            self.rules_cache.forget(user_id);
            match written {
                Err(ServiceError::Storage(StorageError::Conflict)) => continue,
                other => return other,
            }
        }
        Err(ServiceError::Storage(StorageError::Conflict))
    }
}

#[cfg(test)]
mod tests {
    use ruma::push::PredefinedOverrideRuleId;
    use ruma::user_id;

    use super::*;

    #[test]
    fn the_default_content_holds_the_spec_rules() {
        let content = default_rules_content(user_id!("@alice:hs.test"));
        let rules = ruleset_of(user_id!("@alice:hs.test"), &content);
        assert!(rules.get(RuleKind::Override, PredefinedOverrideRuleId::Master.as_str()).is_some());
        assert!(rules.get(RuleKind::Override, PredefinedOverrideRuleId::IsUserMention.as_str()).is_some());
    }

    #[test]
    fn unknown_kinds_are_refused() {
        assert!(check_kind(&RuleKind::from("sideways")).is_err());
        assert!(check_kind(&RuleKind::Room).is_ok());
    }
}
