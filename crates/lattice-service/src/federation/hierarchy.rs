//! Space hierarchies: `GET /rooms/{roomId}/hierarchy` for this server's users, walking the
//! space tree depth-first (as the spec says) over the rooms this server is in and, for rooms it
//! is not in, the summaries other servers give over federation `/hierarchy`; and federation
//! `GET /hierarchy/{roomId}` for other servers.
//!
//! Pagination is stateless: the walk is the same for the same root and parameters while the
//! tree does not change, so `next_batch` holds how many rooms were returned before, and a
//! fingerprint of the root, `suggested_only` and `max_depth` that a later page must repeat.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use lattice_federation::client::Auth;
use ruma::{OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode};
use crate::ServiceError;
use crate::rooms::{SpaceChild, children_of};

/// Rooms one page returns when the client does not say, and at most.
pub const DEFAULT_HIERARCHY_LIMIT: usize = 50;
pub const MAX_HIERARCHY_LIMIT: usize = 100;
/// How deep a walk goes when the client does not say, and at most.
pub const MAX_HIERARCHY_DEPTH: usize = 10;
/// Rooms one walk looks at (visible or not), over all its pages.
const MAX_ROOMS_WALKED: usize = 1_000;
/// Other servers asked in one walk (a room's `via` servers count one each).
const MAX_REMOTE_REQUESTS: usize = 20;
/// How long one federation `/hierarchy` request may take.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a remote summary is reused, and how long a failure is remembered.
const REMOTE_TTL_MS: u64 = 5 * 60 * 1000;
const REMOTE_FAILURE_TTL_MS: u64 = 30 * 1000;
/// Remote summaries kept.
const MAX_CACHED_REMOTE: usize = 1_000;
/// `via` servers tried for one room.
const MAX_VIA_TRIED: usize = 3;

/// Remote rooms' summaries (with `children_state`) by room and `suggested_only`; `None`: no
/// server could or would tell.
#[derive(Default)]
pub(crate) struct RemoteSummaries {
    entries: Mutex<HashMap<(OwnedRoomId, bool), Cached>>,
}

/// When an entry expires, and the summary (`None`: no server could tell).
type Cached = (u64, Option<Value>);

impl RemoteSummaries {
    fn get(&self, key: &(OwnedRoomId, bool), now: u64) -> Option<Option<Value>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(key).filter(|(expires, _)| *expires > now).map(|(_, summary)| summary.clone())
    }

    fn put(&self, key: (OwnedRoomId, bool), summary: Option<Value>, now: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_CACHED_REMOTE {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= MAX_CACHED_REMOTE {
                entries.clear();
            }
        }
        let ttl = if summary.is_some() { REMOTE_TTL_MS } else { REMOTE_FAILURE_TTL_MS };
        entries.insert(key, (now.saturating_add(ttl), summary));
    }
}

/// The parameters of `GET /hierarchy`.
#[derive(Clone, Debug, Default)]
pub struct HierarchyQuery {
    pub suggested_only: bool,
    pub max_depth: Option<u64>,
    pub limit: Option<u64>,
    pub from: Option<String>,
}

/// One room waiting to be looked at: how deep, and the servers its parent named.
struct Pending {
    room_id: OwnedRoomId,
    depth: usize,
    via: Vec<OwnedServerName>,
}

impl Federation {
    /// `GET /rooms/{roomId}/hierarchy`: a page of the rooms of the space tree under `root` that
    /// `user_id` may see, depth-first, each with its `children_state`; a root this server is not
    /// in is described by the server its room ID names. `M_FORBIDDEN` when the user may not see
    /// the root (or nobody could describe it).
    pub async fn space_hierarchy(
        &self,
        user_id: &UserId,
        root: &RoomId,
        query: HierarchyQuery,
    ) -> Result<Value, ServiceError> {
        let limit = match query.limit {
            None => DEFAULT_HIERARCHY_LIMIT,
            Some(0) => return Err(ServiceError::InvalidParam("limit must be greater than zero".into())),
            Some(limit) => usize::try_from(limit).unwrap_or(usize::MAX).min(MAX_HIERARCHY_LIMIT),
        };
        let max_depth = query
            .max_depth
            .map_or(MAX_HIERARCHY_DEPTH, |d| usize::try_from(d).unwrap_or(usize::MAX).min(MAX_HIERARCHY_DEPTH));
        let fingerprint = fingerprint(root, query.suggested_only, max_depth);
        let skip = match &query.from {
            None => 0,
            Some(token) => parse_token(token, &fingerprint)?,
        };
        let forbidden = || ServiceError::Forbidden(format!("{user_id} may not preview {root}"));
        let mut remote_requests = 0usize;
        // A space this server is not in is asked of the server its ID names (room IDs before
        // version 12 carry one; a version-12 ID names none, and the client API gives no `via`).
        let root_via: Vec<OwnedServerName> = root.server_name().map(ToOwned::to_owned).into_iter().collect();
        let root_pending = Pending { room_id: root.to_owned(), depth: 0, via: root_via };
        let root_summary = self
            .summary_for_walk(&root_pending, query.suggested_only, &mut remote_requests)
            .await?
            .ok_or_else(forbidden)?;
        if !self.rooms.user_may_preview(user_id, &root_summary).await? {
            return Err(forbidden());
        }

        let mut stack = vec![root_pending];
        let mut seen: HashSet<OwnedRoomId> = HashSet::new();
        let mut listed = 0usize;
        let mut rooms = Vec::new();
        let mut more = false;
        while let Some(pending) = stack.pop() {
            if seen.len() >= MAX_ROOMS_WALKED {
                break;
            }
            if !seen.insert(pending.room_id.clone()) {
                continue; // A cycle, or a room under two parents: listed once.
            }
            let summary = match pending.depth {
                0 => Some(root_summary.clone()),
                _ => self.summary_for_walk(&pending, query.suggested_only, &mut remote_requests).await?,
            };
            let Some(summary) = summary else { continue };
            if !self.rooms.user_may_preview(user_id, &summary).await? {
                continue;
            }
            if rooms.len() == limit {
                more = true;
                break;
            }
            if pending.depth < max_depth {
                let children: Vec<SpaceChild> =
                    children_of(&summary).into_iter().filter(|c| c.suggested || !query.suggested_only).collect();
                for child in children.into_iter().rev() {
                    stack.push(Pending { room_id: child.room_id, depth: pending.depth + 1, via: child.via });
                }
            }
            listed += 1;
            if listed > skip {
                rooms.push(summary);
            }
        }
        let mut page = json!({ "rooms": rooms });
        if more {
            page["next_batch"] = json!(format!("{fingerprint}_{}", skip + limit));
        }
        Ok(page)
    }

    /// A child's summary: this server's own when it is in the room, else one of the servers
    /// its parent named (cached). `None` when nobody could tell.
    async fn summary_for_walk(
        &self,
        pending: &Pending,
        suggested_only: bool,
        remote_requests: &mut usize,
    ) -> Result<Option<Value>, ServiceError> {
        if let Some(summary) = self.rooms.space_summary(&pending.room_id).await? {
            return Ok(Some(summary));
        }
        let Ok(remote) = self.remote() else { return Ok(None) };
        let now = remote.keys.client().clock().now_ms();
        let key = (pending.room_id.clone(), suggested_only);
        if let Some(cached) = self.hierarchy_cache.get(&key, now) {
            return Ok(cached);
        }
        let client = remote.keys.client().clone();
        let path = format!(
            "/_matrix/federation/v1/hierarchy/{}?suggested_only={suggested_only}",
            encode(pending.room_id.as_str())
        );
        let mut found = None;
        for server in pending.via.iter().filter(|s| *s != self.server_name()).take(MAX_VIA_TRIED) {
            if *remote_requests >= MAX_REMOTE_REQUESTS {
                // Not cached: another walk may have the budget for it.
                return Ok(None);
            }
            *remote_requests += 1;
            let request = client.request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES);
            let answer = match tokio::time::timeout(REMOTE_TIMEOUT, request).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(error)) => {
                    tracing::debug!(%server, room_id = %pending.room_id, %error, "remote hierarchy failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(%server, room_id = %pending.room_id, "remote hierarchy timed out");
                    continue;
                }
            };
            let Ok(answer) = serde_json::from_slice::<Value>(&answer) else { continue };
            let room = &answer["room"];
            // The answer must be about the room asked for.
            if room["room_id"].as_str() == Some(pending.room_id.as_str()) && room.is_object() {
                let mut room = room.clone();
                if !room["children_state"].is_array() {
                    room["children_state"] = json!([]);
                }
                found = Some(room);
                break;
            }
        }
        self.hierarchy_cache.put(key, found.clone(), now);
        Ok(found)
    }

    /// Federation `GET /hierarchy/{roomId}`: the room and those of its children this server is
    /// in that `origin` could join or peek; the others it knows as `inaccessible_children`.
    /// `M_NOT_FOUND` when this server is not in the room or `origin` may not preview it.
    pub async fn hierarchy_for_server(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        suggested_only: bool,
    ) -> Result<Value, ServiceError> {
        let not_found = || ServiceError::NotFound(format!("{room_id} is not known here or not previewable"));
        let summary = self.rooms.space_summary(room_id).await?.ok_or_else(not_found)?;
        self.require_acl(origin, room_id).await?;
        if !self.rooms.server_may_preview(origin, &summary).await? {
            return Err(not_found());
        }
        let mut children = Vec::new();
        let mut inaccessible = Vec::new();
        for child in children_of(&summary) {
            if suggested_only && !child.suggested {
                continue;
            }
            let Some(child_summary) = self.rooms.space_summary(&child.room_id).await? else { continue };
            let allowed = self.rooms.server_allowed_by_acl(origin, &child.room_id).await?
                && self.rooms.server_may_preview(origin, &child_summary).await?;
            match allowed {
                true => children.push(child_summary),
                false => inaccessible.push(child.room_id),
            }
        }
        Ok(json!({ "room": summary, "children": children, "inaccessible_children": inaccessible }))
    }
}

/// What a `next_batch` is bound to: the root and the parameters the spec says may not change.
fn fingerprint(root: &RoomId, suggested_only: bool, max_depth: usize) -> String {
    let digest = Sha256::digest(format!("{root}\0{suggested_only}\0{max_depth}").as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The rooms listed before a `from` token, when the token is of this walk.
fn parse_token(token: &str, fingerprint: &str) -> Result<usize, ServiceError> {
    let unknown = || ServiceError::InvalidParam(format!("unknown from token {token:?}"));
    let (bound_to, skip) = token.split_once('_').ok_or_else(unknown)?;
    let skip: usize = skip.parse().map_err(|_| unknown())?;
    if bound_to.len() != fingerprint.len() || !bound_to.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unknown());
    }
    if bound_to != fingerprint {
        return Err(ServiceError::InvalidParam(
            "from belongs to another hierarchy request: the room, suggested_only and max_depth must not change".into(),
        ));
    }
    Ok(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_the_walk() {
        let root = RoomId::parse("!space:hs.test").unwrap();
        let print = fingerprint(&root, false, 3);
        assert_eq!(parse_token(&format!("{print}_20"), &print).unwrap(), 20);
        let other = fingerprint(&root, true, 3);
        assert!(matches!(parse_token(&format!("{other}_20"), &print), Err(ServiceError::InvalidParam(_))));
        for bad in ["", "_", "abc", &format!("{print}_x"), &format!("{print}_-1")] {
            assert!(parse_token(bad, &print).is_err(), "{bad}");
        }
    }
}
