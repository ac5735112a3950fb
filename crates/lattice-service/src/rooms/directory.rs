//! The public room directory: which rooms are published, and listing them with filters and
//! pagination. Rooms are ordered by joined members (most first), then room ID; a page token
//! names the sort key of the room it continues from, so paging never repeats or skips a room
//! whose member count stays put.
//!
//! Anyone may list the directory without a token, so a listing must not cost what the rooms
//! weigh: entries come from the member counts ingest keeps in each room record and a fixed
//! number of current-state reads, and the sorted list is kept in memory for
//! `ServiceConfig::public_rooms_cache_ms` (dropped at once when a room is published or hidden).

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lattice_storage::records::RoomRecord;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::{RoomId, UserId};
use serde_json::{Map, Value, json};

use super::Rooms;
use crate::ServiceError;

/// Published rooms one listing looks at; past this the directory needs a stored ranking.
pub const MAX_DIRECTORY_ROOMS: usize = 1_000;
/// Rooms per page, at most (and when the client names no limit).
pub const MAX_PUBLIC_ROOMS_LIMIT: usize = 100;
/// Longest search term looked for, in bytes.
const MAX_SEARCH_TERM_BYTES: usize = 256;
/// Room types one filter may name.
const MAX_ROOM_TYPES: usize = 32;

/// A `publicRooms` request, parsed.
#[derive(Debug, Default)]
pub struct PublicRoomsQuery {
    pub limit: Option<usize>,
    pub since: Option<String>,
    pub generic_search_term: Option<String>,
    /// `None`: every type; `Some(None)` entries stand for rooms without a type.
    pub room_types: Option<Vec<Option<String>>>,
}

/// One page of the directory.
#[derive(Debug)]
pub struct PublicRoomsPage {
    pub chunk: Vec<Value>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total_room_count_estimate: usize,
}

/// The sorted directory as last built, shared by every listing until it expires.
#[derive(Default)]
pub(crate) struct DirectoryCache {
    /// Held while the list is rebuilt, so concurrent listings wait for one build.
    built: tokio::sync::Mutex<Option<BuiltDirectory>>,
    /// Bumped whenever the set of published rooms changes; a list built before is stale.
    generation: AtomicU64,
}

struct BuiltDirectory {
    built_ms: u64,
    generation: u64,
    rooms: Arc<Vec<Summary>>,
}

impl DirectoryCache {
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where a page starts: after (`n…`) or before (`p…`) a room's sort key.
#[derive(Debug, PartialEq, Eq)]
enum PageToken {
    After(SortKey),
    Before(SortKey),
}

/// Most joined members first, then room ID.
type SortKey = (Reverse<u64>, String);

impl PageToken {
    fn parse(token: &str) -> Result<Self, ServiceError> {
        let bad = || ServiceError::InvalidParam(format!("unknown pagination token {token:?}"));
        let (direction, rest) = token.split_at_checked(1).ok_or_else(bad)?;
        let (members, room_id) = rest.split_once('_').ok_or_else(bad)?;
        let key = (Reverse(members.parse().map_err(|_| bad())?), room_id.to_owned());
        match direction {
            "n" => Ok(PageToken::After(key)),
            "p" => Ok(PageToken::Before(key)),
            _ => Err(bad()),
        }
    }

    fn render(&self) -> String {
        let (direction, (Reverse(members), room_id)) = match self {
            PageToken::After(key) => ("n", key),
            PageToken::Before(key) => ("p", key),
        };
        format!("{direction}{members}_{room_id}")
    }
}

impl Rooms {
    /// `PUT /directory/list/room/{roomId}`: for users who may change the room's canonical alias,
    /// and server admins.
    pub async fn set_room_visibility(&self, user: &UserId, room_id: &RoomId, public: bool) -> Result<(), ServiceError> {
        self.room_version(room_id).await?;
        if !self.is_server_admin(user).await? && !self.may_change_canonical_alias(user, room_id).await? {
            return Err(ServiceError::Forbidden(format!(
                "publishing {room_id} needs the power to send m.room.canonical_alias in it"
            )));
        }
        let mut batch = WriteBatch::new();
        self.publish_in_batch(&mut batch, room_id, public);
        self.kv.write(batch).await?;
        // Again after the write: a listing built between the first invalidation and the write
        // would otherwise be kept.
        self.directory_cache.invalidate();
        Ok(())
    }

    pub(crate) fn publish_in_batch(&self, batch: &mut WriteBatch, room_id: &RoomId, public: bool) {
        self.directory_cache.invalidate();
        let key = keys::public_room(room_id.as_str());
        if public {
            batch.put(Table::PublicRooms, key, Vec::new());
        } else {
            batch.delete(Table::PublicRooms, key);
        }
    }

    /// `GET /directory/list/room/{roomId}`: whether the room is published.
    pub async fn room_is_public(&self, room_id: &RoomId) -> Result<bool, ServiceError> {
        self.room_version(room_id).await?;
        Ok(self.kv.get(Table::PublicRooms, &keys::public_room(room_id.as_str())).await?.is_some())
    }

    /// `GET`/`POST /publicRooms` on this server.
    pub async fn public_rooms(&self, query: PublicRoomsQuery) -> Result<PublicRoomsPage, ServiceError> {
        let limit = query.limit.unwrap_or(MAX_PUBLIC_ROOMS_LIMIT).clamp(1, MAX_PUBLIC_ROOMS_LIMIT);
        let token = query.since.as_deref().map(PageToken::parse).transpose()?;
        let search = query.generic_search_term.as_deref().map(str::trim).filter(|t| !t.is_empty());
        if search.is_some_and(|t| t.len() > MAX_SEARCH_TERM_BYTES) {
            return Err(ServiceError::InvalidParam(format!("search terms are at most {MAX_SEARCH_TERM_BYTES} bytes")));
        }
        if query.room_types.as_ref().is_some_and(|t| t.len() > MAX_ROOM_TYPES) {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_ROOM_TYPES} room types")));
        }
        let directory = self.sorted_directory().await?;
        let rooms: Vec<&Summary> =
            directory.iter().filter(|room| matches_filter(room, search, query.room_types.as_deref())).collect();
        let total_room_count_estimate = rooms.len();
        let (start, end) =
            page_bounds(&rooms.iter().map(|room| sort_key(room)).collect::<Vec<_>>(), token.as_ref(), limit);
        let next_batch =
            (end < rooms.len() && end > start).then(|| PageToken::After(sort_key(rooms[end - 1])).render());
        let prev_batch = (start > 0 && end > start).then(|| PageToken::Before(sort_key(rooms[start])).render());
        let chunk = rooms[start..end].iter().map(|room| Value::Object(room.0.clone())).collect();
        Ok(PublicRoomsPage { chunk, next_batch, prev_batch, total_room_count_estimate })
    }

    /// Every published room's entry, sorted: from the cache while it is fresh, else rebuilt.
    async fn sorted_directory(&self) -> Result<Arc<Vec<Summary>>, ServiceError> {
        let cache = &self.directory_cache;
        let mut built = cache.built.lock().await;
        let now = self.now_ms();
        let generation = cache.generation.load(Ordering::SeqCst);
        if let Some(fresh) = built.as_ref().filter(|b| {
            b.generation == generation && now.saturating_sub(b.built_ms) < self.config.public_rooms_cache_ms
        }) {
            return Ok(fresh.rooms.clone());
        }
        let rooms = Arc::new(self.build_directory().await?);
        *built = Some(BuiltDirectory { built_ms: now, generation, rooms: rooms.clone() });
        Ok(rooms)
    }

    /// Reads every published room's entry (a fixed number of reads per room) and sorts them.
    async fn build_directory(&self) -> Result<Vec<Summary>, ServiceError> {
        let published =
            self.kv.scan(Table::PublicRooms, &KeyRange::all(), Direction::Forward, MAX_DIRECTORY_ROOMS).await?;
        let mut rooms = Vec::with_capacity(published.len());
        for (key, _) in published {
            let room_id = String::from_utf8_lossy(&key).into_owned();
            let room_id = <&RoomId>::try_from(room_id.as_str()).map_err(|e| ServiceError::Internal(e.to_string()))?;
            rooms.push(self.directory_entry(room_id).await?);
        }
        rooms.sort_by_cached_key(sort_key);
        Ok(rooms)
    }

    /// A room's summary as the directory lists it (the hierarchy endpoints start from it).
    pub(super) async fn room_summary(&self, room_id: &RoomId) -> Result<Map<String, Value>, ServiceError> {
        Ok(self.directory_entry(room_id).await?.0)
    }

    /// The directory entry of a room, from its current state; absent optional fields are left out.
    async fn directory_entry(&self, room_id: &RoomId) -> Result<Summary, ServiceError> {
        let mut entry = Map::new();
        entry.insert("room_id".into(), json!(room_id));
        let state = |kind: &'static str| self.current_state_content(room_id, kind, "");
        let text = |content: Option<Value>, field: &str| content.and_then(|c| c[field].as_str().map(str::to_owned));
        if let Some(name) = text(state("m.room.name").await?, "name") {
            entry.insert("name".into(), json!(name));
        }
        if let Some(topic) = text(state("m.room.topic").await?, "topic") {
            entry.insert("topic".into(), json!(topic));
        }
        if let Some(alias) = text(state("m.room.canonical_alias").await?, "alias") {
            entry.insert("canonical_alias".into(), json!(alias));
        }
        if let Some(avatar) = text(state("m.room.avatar").await?, "url") {
            entry.insert("avatar_url".into(), json!(avatar));
        }
        if let Some(join_rule) = text(state("m.room.join_rules").await?, "join_rule") {
            entry.insert("join_rule".into(), json!(join_rule));
        }
        if let Some(room_type) = text(state("m.room.create").await?, "type") {
            entry.insert("room_type".into(), json!(room_type));
        }
        let visibility = text(state("m.room.history_visibility").await?, "history_visibility");
        entry.insert("world_readable".into(), json!(visibility.as_deref() == Some("world_readable")));
        let guest_access = text(state("m.room.guest_access").await?, "guest_access");
        entry.insert("guest_can_join".into(), json!(guest_access.as_deref() == Some("can_join")));
        entry.insert("num_joined_members".into(), json!(self.joined_members_kept(room_id).await?));
        Ok(Summary(entry))
    }

    /// The joined-member count ingest keeps in the room record; rooms stored before it kept
    /// counts are counted from their members.
    async fn joined_members_kept(&self, room_id: &RoomId) -> Result<u64, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        match room.and_then(|r| r.value.member_counts) {
            Some(counts) => Ok(counts.joined),
            None => self.joined_member_count(room_id).await,
        }
    }

    /// Members whose current membership is `join` (a bounded scan of the room's member state).
    async fn joined_member_count(&self, room_id: &RoomId) -> Result<u64, ServiceError> {
        let prefix = keys::current_state(room_id.as_str(), "m.room.member", "");
        let rows = self
            .kv
            .scan(Table::CurrentState, &KeyRange::prefix(&prefix), Direction::Forward, lattice_storage::MAX_SCAN_ROWS)
            .await?;
        let mut joined = 0;
        for (key, _) in rows {
            // The memberships table mirrors the room's current member state: one small read
            // instead of parsing each member event.
            let user = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let membership = self.kv.get(Table::Memberships, &keys::membership(&user, room_id.as_str())).await?;
            joined += u64::from(membership.as_deref() == Some(b"join".as_slice()));
        }
        Ok(joined)
    }
}

/// A directory entry under construction (the chunk object).
#[derive(Debug)]
struct Summary(Map<String, Value>);

fn sort_key(room: &Summary) -> SortKey {
    let members = room.0.get("num_joined_members").and_then(Value::as_u64).unwrap_or(0);
    let room_id = room.0.get("room_id").and_then(Value::as_str).unwrap_or_default().to_owned();
    (Reverse(members), room_id)
}

/// Case-insensitive search over name, topic and canonical alias; room types where `None`
/// stands for rooms without one.
fn matches_filter(room: &Summary, search: Option<&str>, room_types: Option<&[Option<String>]>) -> bool {
    if let Some(term) = search {
        let term = term.to_lowercase();
        let found = ["name", "topic", "canonical_alias"]
            .iter()
            .filter_map(|field| room.0.get(*field).and_then(Value::as_str))
            .any(|text| text.to_lowercase().contains(&term));
        if !found {
            return false;
        }
    }
    if let Some(types) = room_types
        && !types.is_empty()
    {
        let room_type = room.0.get("room_type").and_then(Value::as_str);
        return types.iter().any(|wanted| wanted.as_deref() == room_type);
    }
    true
}

/// The index range `[start, end)` of the page in `keys` (sorted) that `token` asks for.
fn page_bounds(keys: &[SortKey], token: Option<&PageToken>, limit: usize) -> (usize, usize) {
    match token {
        None => (0, limit.min(keys.len())),
        Some(PageToken::After(key)) => {
            let start = keys.partition_point(|k| k <= key);
            (start, (start + limit).min(keys.len()))
        }
        Some(PageToken::Before(key)) => {
            let end = keys.partition_point(|k| k < key);
            (end.saturating_sub(limit), end)
        }
    }
}

#[cfg(test)]
mod tests {
    use lattice_storage::MemoryStore;

    use super::*;
    use crate::rooms::{CreateRoom, Preset};
    use crate::{PasswordHasher, Service, ServiceConfig, SystemClock};

    fn cached_service(kv: Arc<MemoryStore>) -> Service {
        let config = ServiceConfig { public_rooms_cache_ms: 3_600_000, ..crate::test_config("hs.test") };
        let hasher = PasswordHasher::new(64, 1).unwrap();
        Service::new(config, kv, Arc::new(SystemClock), hasher, crate::test_signing_key())
    }

    async fn join_members(service: &Service, room: &RoomId, from: usize, to: usize) {
        for i in from..to {
            let user = UserId::parse(format!("@member{i}:hs.test")).unwrap();
            service.rooms().join_room(&user, room, None).await.unwrap();
        }
    }

    async fn rows_read_listing(service: &Service, kv: &MemoryStore) -> (u64, PublicRoomsPage) {
        let before = kv.rows_read();
        let page =
            service.rooms().public_rooms(PublicRoomsQuery { limit: Some(1), ..Default::default() }).await.unwrap();
        (kv.rows_read() - before, page)
    }

    #[tokio::test]
    async fn a_listing_reads_nothing_per_member_and_nothing_at_all_while_cached() {
        let kv = Arc::new(MemoryStore::new());
        let service = cached_service(kv.clone());
        let alice = UserId::parse("@alice:hs.test").unwrap();
        let public = || CreateRoom { preset: Some(Preset::PublicChat), public_visibility: true, ..Default::default() };
        service.rooms().create_room(&alice, public()).await.unwrap();
        let big = service.rooms().create_room(&alice, public()).await.unwrap();
        join_members(&service, &big, 0, 20).await;

        let (built, page) = rows_read_listing(&service, &kv).await;
        assert_eq!(page.chunk[0]["num_joined_members"], 21, "the counts ingest keeps");
        assert_eq!(page.total_room_count_estimate, 2);
        let (cached, _) = rows_read_listing(&service, &kv).await;
        assert_eq!(cached, 0, "a cached listing reads nothing");

        // Five times the members; publishing again drops the cache.
        join_members(&service, &big, 20, 100).await;
        service.rooms().set_room_visibility(&alice, &big, true).await.unwrap();
        let (rebuilt, page) = rows_read_listing(&service, &kv).await;
        assert_eq!(page.chunk[0]["num_joined_members"], 101);
        assert_eq!(rebuilt, built, "a rebuild costs the same whatever the rooms weigh");
        assert!(built < 2 * 40, "a fixed number of reads per published room: {built}");
    }

    #[tokio::test]
    async fn hiding_a_room_drops_it_from_the_cached_listing_at_once() {
        let kv = Arc::new(MemoryStore::new());
        let service = cached_service(kv.clone());
        let alice = UserId::parse("@alice:hs.test").unwrap();
        let room = service
            .rooms()
            .create_room(&alice, CreateRoom { public_visibility: true, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(rows_read_listing(&service, &kv).await.1.chunk.len(), 1);
        service.rooms().set_room_visibility(&alice, &room, false).await.unwrap();
        assert!(rows_read_listing(&service, &kv).await.1.chunk.is_empty());
    }

    fn key(members: u64, room: &str) -> SortKey {
        (Reverse(members), room.to_owned())
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        for token in [PageToken::After(key(3, "!a:hs")), PageToken::Before(key(0, "!b_c:hs"))] {
            assert_eq!(PageToken::parse(&token.render()).unwrap(), token);
        }
        for bad in ["", "n", "x1_!a:hs", "n_!a:hs", "n-1_!a:hs", "nabc_!a:hs"] {
            assert!(PageToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pages_forward_and_back_without_repeats_or_gaps() {
        let keys = vec![key(5, "!e"), key(3, "!a"), key(3, "!b"), key(1, "!c"), key(0, "!d")];
        assert_eq!(page_bounds(&keys, None, 2), (0, 2));
        assert_eq!(page_bounds(&keys, Some(&PageToken::After(keys[1].clone())), 2), (2, 4));
        assert_eq!(page_bounds(&keys, Some(&PageToken::After(keys[3].clone())), 2), (4, 5));
        assert_eq!(page_bounds(&keys, Some(&PageToken::Before(keys[4].clone())), 2), (2, 4));
        assert_eq!(page_bounds(&keys, Some(&PageToken::Before(keys[1].clone())), 2), (0, 1));
        // A room that left the directory: the page continues after where it would sort.
        assert_eq!(page_bounds(&keys, Some(&PageToken::After(key(2, "!zz"))), 10), (3, 5));
    }

    #[test]
    fn filter_searches_name_topic_alias_case_insensitively_and_room_types() {
        let room = |extra: Value| {
            let mut map = json!({ "room_id": "!r:hs", "name": "Coffee Lovers" }).as_object().unwrap().clone();
            map.extend(extra.as_object().unwrap().clone());
            Summary(map)
        };
        let plain = room(json!({ "topic": "Beans", "canonical_alias": "#brew:hs" }));
        assert!(matches_filter(&plain, Some("coffee"), None));
        assert!(matches_filter(&plain, Some("BEAN"), None));
        assert!(matches_filter(&plain, Some("#Brew"), None));
        assert!(!matches_filter(&plain, Some("tea"), None));
        assert!(matches_filter(&plain, None, Some(&[None])));
        assert!(!matches_filter(&plain, None, Some(&[Some("m.space".into())])));
        assert!(matches_filter(&plain, None, Some(&[])));
        let space = room(json!({ "room_type": "m.space" }));
        assert!(matches_filter(&space, None, Some(&[None, Some("m.space".into())])));
        assert!(!matches_filter(&space, None, Some(&[None])));
    }
}
