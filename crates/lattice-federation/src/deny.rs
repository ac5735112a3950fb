//! The operator's deny-list of servers (`[federation] deny_servers`): patterns with `*` and `?`
//! as in `m.room.server_acl`, matched by ruma's ACL matcher (the host, not the port). A denied
//! server's requests are refused (`403 M_FORBIDDEN`) before its keys are fetched, and nothing
//! is sent to it.

use ruma::ServerName;
use ruma::events::room::server_acl::RoomServerAclEventContent;

#[derive(Clone, Debug, Default)]
pub struct DenyList {
    /// An ACL that allows everything but the patterns; `None` when there are none.
    acl: Option<RoomServerAclEventContent>,
}

impl DenyList {
    pub fn new(patterns: Vec<String>) -> Self {
        if patterns.is_empty() {
            return Self::default();
        }
        Self { acl: Some(RoomServerAclEventContent::new(true, vec!["*".to_owned()], patterns)) }
    }

    pub fn denies(&self, server: &ServerName) -> bool {
        self.acl.as_ref().is_some_and(|acl| !acl.is_allowed(server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str) -> &ServerName {
        <&ServerName>::try_from(name).expect("a server name")
    }

    #[test]
    fn patterns_match_hosts_with_wildcards_and_nothing_else() {
        let deny = DenyList::new(vec!["evil.example".into(), "*.spam.example".into(), "10.0.0.?".into()]);
        for denied in ["evil.example", "evil.example:8448", "a.spam.example", "b.c.spam.example", "10.0.0.7"] {
            assert!(deny.denies(server(denied)), "{denied}");
        }
        for allowed in ["good.example", "spam.example", "notevil.example", "10.0.0.17", "matrix.org"] {
            assert!(!deny.denies(server(allowed)), "{allowed}");
        }
        assert!(!DenyList::new(Vec::new()).denies(server("evil.example")));
    }
}
