//! The user directory (`POST /user_directory/search`, spec v1.16 "User Directory"): the users a
//! searcher may find are those sharing a joined room with them and those joined to a room whose
//! join rule is `public` or whose history is `world_readable` (the spec's minimum), plus, when
//! the server is configured so, every local user.
//!
//! There is no separate index: the search reads the membership index (`memberships`, the rows
//! ingest writes in each member event's own batch), the join rule and history visibility of each
//! room a candidate is joined to (once per room and search), and the profile of each visible
//! candidate — a local user's stored profile, a remote user's member event. So the directory is
//! always exactly as current as memberships and profiles, with nothing to keep in step; the cost
//! is one pass over the membership rows per search (measured in `docs/benchmarks.md`), bounded
//! by [`MAX_SCANNED_MEMBERSHIPS`].

use std::collections::{HashMap, HashSet};

use lattice_storage::{Direction, KeyRange, Table};
use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::Rooms;
use crate::ServiceError;

/// Results a search returns when the client asks for none (the spec's default).
pub const DEFAULT_DIRECTORY_LIMIT: usize = 10;
/// At most this many results, whatever the client asks for.
pub const MAX_DIRECTORY_LIMIT: usize = 100;
/// A search term longer than this is refused (`M_INVALID_PARAM`): no display name is longer.
pub const MAX_SEARCH_TERM_BYTES: usize = 256;
/// A search reads at most this many membership rows; past it the rest of the server is not
/// searched (a bound on one request's work, far above the servers this design is for).
pub const MAX_SCANNED_MEMBERSHIPS: usize = 1_000_000;
const PAGE_ROWS: usize = 1_000;

/// One user found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryUser {
    pub user_id: OwnedUserId,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
}

/// What a search found: at most the limit, and whether more matched.
#[derive(Clone, Debug, Default)]
pub struct DirectoryPage {
    pub results: Vec<DirectoryUser>,
    pub limited: bool,
}

/// The term as words, lowercased: a user matches when every word is part of their user ID or
/// display name.
fn words_of(term: &str) -> Vec<String> {
    term.split_whitespace().map(str::to_lowercase).collect()
}

/// How well a user matches: 0 when some word starts their display name or localpart, 1 when
/// every word is somewhere in them; `None` when a word is missing.
fn match_rank(words: &[String], user: &DirectoryUser) -> Option<u8> {
    let id = user.user_id.as_str().to_lowercase();
    let localpart = user.user_id.localpart().to_lowercase();
    let name = user.display_name.as_deref().map(str::to_lowercase).unwrap_or_default();
    if !words.iter().all(|word| id.contains(word.as_str()) || name.contains(word.as_str())) {
        return None;
    }
    let starts = words.iter().any(|word| {
        localpart.starts_with(word.as_str()) || name.split_whitespace().any(|w| w.starts_with(word.as_str()))
    });
    Some(if starts { 0 } else { 1 })
}

impl Rooms {
    /// Searches the users `searcher` may find for `term`; `all_local_users` adds every active
    /// local account (the `user_directory.search_all_users` option).
    pub async fn search_user_directory(
        &self,
        searcher: &UserId,
        term: &str,
        limit: Option<usize>,
        all_local_users: bool,
    ) -> Result<DirectoryPage, ServiceError> {
        if term.len() > MAX_SEARCH_TERM_BYTES {
            return Err(ServiceError::InvalidParam(format!(
                "search_term is longer than {MAX_SEARCH_TERM_BYTES} bytes"
            )));
        }
        let limit = limit.unwrap_or(DEFAULT_DIRECTORY_LIMIT).min(MAX_DIRECTORY_LIMIT);
        let words = words_of(term);
        if words.is_empty() || limit == 0 {
            return Ok(DirectoryPage::default());
        }

        // Every joined membership on the server, by user: (user, their joined rooms).
        let joined = self.joined_memberships().await?;
        let searcher_rooms: HashSet<&str> =
            joined.get(searcher.as_str()).map(|rooms| rooms.iter().map(String::as_str).collect()).unwrap_or_default();
        let mut open_rooms: HashMap<String, bool> = HashMap::new();
        let mut visible: Vec<(OwnedUserId, Option<String>)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (user, rooms) in &joined {
            let shared = rooms.iter().find(|room| searcher_rooms.contains(room.as_str()));
            let through = match shared {
                Some(room) => Some(room.clone()),
                None => {
                    let mut found = None;
                    for room in rooms {
                        if self.is_open_room(room, &mut open_rooms).await? {
                            found = Some(room.clone());
                            break;
                        }
                    }
                    found
                }
            };
            let Some(room) = through else { continue };
            let Ok(user_id) = OwnedUserId::try_from(user.as_str()) else { continue };
            seen.insert(user.clone());
            visible.push((user_id, Some(room)));
        }
        if all_local_users {
            for user_id in self.accounts.active_local_users().await? {
                if seen.insert(user_id.to_string()) {
                    visible.push((user_id, None));
                }
            }
        }

        let mut found: Vec<(u8, DirectoryUser)> = Vec::new();
        for (user_id, room) in visible {
            let user = self.directory_profile(user_id, room.as_deref()).await?;
            if let Some(rank) = match_rank(&words, &user) {
                found.push((rank, user));
            }
        }
        // Best matches first, then users with a display name, then by user ID (stable pages).
        found.sort_by(|(a_rank, a), (b_rank, b)| {
            a_rank
                .cmp(b_rank)
                .then(a.display_name.is_none().cmp(&b.display_name.is_none()))
                .then(a.user_id.cmp(&b.user_id))
        });
        let limited = found.len() > limit;
        let results = found.into_iter().take(limit).map(|(_, user)| user).collect();
        Ok(DirectoryPage { results, limited })
    }

    /// Joined memberships by user, from the membership index (`user\0room` → membership).
    async fn joined_memberships(&self) -> Result<HashMap<String, Vec<String>>, ServiceError> {
        let mut joined: HashMap<String, Vec<String>> = HashMap::new();
        let mut range = KeyRange::all();
        let mut scanned = 0;
        loop {
            let page = self.kv.scan(Table::Memberships, &range, Direction::Forward, PAGE_ROWS).await?;
            let full = page.len() == PAGE_ROWS;
            scanned += page.len();
            for (key, membership) in &page {
                if membership.as_slice() != b"join" {
                    continue;
                }
                let Some(split) = key.iter().position(|&byte| byte == 0) else { continue };
                let (Ok(user), Ok(room)) = (std::str::from_utf8(&key[..split]), std::str::from_utf8(&key[split + 1..]))
                else {
                    continue;
                };
                joined.entry(user.to_owned()).or_default().push(room.to_owned());
            }
            match page.last() {
                Some((last, _)) if full && scanned < MAX_SCANNED_MEMBERSHIPS => {
                    range.start = std::ops::Bound::Excluded(last.clone());
                }
                _ => return Ok(joined),
            }
        }
    }

    /// A room whose members anyone may find: join rule `public` or history `world_readable`.
    async fn is_open_room(&self, room: &str, known: &mut HashMap<String, bool>) -> Result<bool, ServiceError> {
        if let Some(open) = known.get(room) {
            return Ok(*open);
        }
        let Ok(room_id) = <&RoomId>::try_from(room) else { return Ok(false) };
        let join_rule = self.current_state_content(room_id, "m.room.join_rules", "").await?;
        let open = join_rule.is_some_and(|content| content["join_rule"] == "public")
            || self
                .current_state_content(room_id, "m.room.history_visibility", "")
                .await?
                .is_some_and(|content| content["history_visibility"] == "world_readable");
        known.insert(room.to_owned(), open);
        Ok(open)
    }

    /// A user's display name and avatar: a local user's profile, a remote user's member event
    /// in the room they were found through.
    async fn directory_profile(&self, user_id: OwnedUserId, room: Option<&str>) -> Result<DirectoryUser, ServiceError> {
        if user_id.server_name() == self.server_name() {
            let profile = self.accounts.member_profile(&user_id).await?;
            return Ok(DirectoryUser { user_id, display_name: profile.displayname, avatar_url: profile.avatar_url });
        }
        let content = match room.and_then(|room| <&RoomId>::try_from(room).ok()) {
            Some(room_id) => self.current_state_content(room_id, "m.room.member", user_id.as_str()).await?,
            None => None,
        };
        let field = |name: &str| content.as_ref().and_then(|c: &Value| c[name].as_str()).map(str::to_owned);
        Ok(DirectoryUser { display_name: field("displayname"), avatar_url: field("avatar_url"), user_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, name: Option<&str>) -> DirectoryUser {
        DirectoryUser {
            user_id: OwnedUserId::try_from(id).unwrap(),
            display_name: name.map(str::to_owned),
            avatar_url: None,
        }
    }

    #[test]
    fn every_word_must_match_the_id_or_the_name_without_case() {
        let words = words_of("ali SMITH");
        assert_eq!(match_rank(&words, &user("@alice:hs.test", Some("Alice Smith"))), Some(0));
        assert_eq!(match_rank(&words, &user("@alice:hs.test", Some("Alice Jones"))), None);
        assert_eq!(match_rank(&words_of("ice"), &user("@alice:hs.test", None)), Some(1));
        assert_eq!(match_rank(&words_of("hs.test"), &user("@bob:hs.test", None)), Some(1));
        assert!(words_of("   ").is_empty());
    }
}
