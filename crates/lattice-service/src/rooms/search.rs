//! Message search (`POST /search`): a word index ingest keeps in each event's own batch, and the
//! query over it.
//!
//! The index (`search_words`, `room\0word\0ts·order` → event ID) has one row per distinct word
//! of an accepted event's searchable text: `content.body` of `m.room.message`, `content.name` of
//! `m.room.name`, `content.topic` of `m.room.topic`. Words are the Unicode words of the text
//! (UAX #29 word boundaries, `unicode-segmentation`), lowercased. Live and backfilled events are
//! indexed, outliers, soft-failed and rejected ones are not, nor encrypted ones (their text is
//! not the server's to read). A redaction deletes the target's rows in the redaction's batch.
//!
//! A query's words are ANDed; the last one also matches as a prefix (`hel` finds `hello`). The
//! rows of one word (the longest full word, the likeliest to be rare; or, for a one-word query,
//! the word as a prefix) are read per room newest first and merged across rooms; each candidate
//! is checked against the stored event (every word, the filter, the requested keys) and against
//! history visibility with the room's [`Viewer`]. Only rooms the user is joined to now are
//! searched, as Synapse does: a user who left stops finding the room's messages.
//!
//! Ranking (`order_by: rank`) is the number of occurrences of the query's words in the text;
//! ties go to the newer event. Every request reads at most [`MAX_ROWS_SCANNED`] index rows and
//! checks at most [`MAX_CANDIDATES`] matches: a rank ordering, and `count`, cover the newest
//! matches up to that bound.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_storage::records::{EventRecord, EventStatus};
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::state_res::Event;
use ruma::{CanonicalJsonValue, OwnedRoomId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use unicode_segmentation::UnicodeSegmentation;

use super::Rooms;
use super::filter::EventFilter;
use super::visibility::Viewer;
use crate::ServiceError;

/// Results one page returns when the filter does not say.
const DEFAULT_SEARCH_LIMIT: usize = 10;
/// The most results one page returns (a larger `filter.limit` is lowered to it).
pub const MAX_SEARCH_LIMIT: usize = 100;
/// The most words a query may have.
const MAX_QUERY_WORDS: usize = 16;
/// The longest search term, in bytes.
const MAX_TERM_BYTES: usize = 1_000;
/// Index rows one request reads, all rooms together.
pub(crate) const MAX_ROWS_SCANNED: usize = 10_000;
/// Matches one request checks; `rank` orders and `count` counts within them.
pub(crate) const MAX_CANDIDATES: usize = 1_000;
/// Rows read from one room's index at a time.
const ROOM_CHUNK: usize = 32;
/// Words longer than this (in bytes) are not indexed, nor searchable: no one types them.
const MAX_WORD_BYTES: usize = 100;
/// Distinct words indexed per event (a PDU is at most 65,536 bytes anyway).
const MAX_WORDS_PER_EVENT: usize = 2_000;
/// The most context events on either side of a result.
const MAX_CONTEXT_LIMIT: usize = 20;

/// `order_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchOrder {
    Recent,
    Rank,
}

/// `search_categories.room_events` as the client sent it.
#[derive(Debug, Deserialize)]
pub struct SearchCriteria {
    pub search_term: String,
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    #[serde(default)]
    pub filter: Option<Value>,
    #[serde(default)]
    pub order_by: Option<String>,
    #[serde(default)]
    pub event_context: Option<ContextSpec>,
    #[serde(default)]
    pub include_state: bool,
    #[serde(default)]
    pub groupings: Option<Groupings>,
}

#[derive(Debug, Deserialize)]
pub struct ContextSpec {
    #[serde(default = "default_context_limit")]
    pub before_limit: u64,
    #[serde(default = "default_context_limit")]
    pub after_limit: u64,
    #[serde(default)]
    pub include_profile: bool,
}

fn default_context_limit() -> u64 {
    5
}

#[derive(Debug, Default, Deserialize)]
pub struct Groupings {
    #[serde(default)]
    pub group_by: Vec<Grouping>,
}

#[derive(Debug, Deserialize)]
pub struct Grouping {
    pub key: Option<String>,
}

/// The field of each searchable event type, and the search key naming it.
const SEARCHABLE: [(&str, &str, &str); 3] = [
    ("m.room.message", "body", "content.body"),
    ("m.room.name", "name", "content.name"),
    ("m.room.topic", "topic", "content.topic"),
];

/// The searchable field of events of `kind`.
fn field_of(kind: &str) -> Option<&'static str> {
    SEARCHABLE.iter().find(|(k, _, _)| *k == kind).map(|(_, field, _)| *field)
}

/// The words of `text` as the index holds them: Unicode words, lowercased, each at most
/// [`MAX_WORD_BYTES`] long, in order, with repeats.
pub(crate) fn words_of(text: &str) -> impl Iterator<Item = String> + '_ {
    text.unicode_words().map(str::to_lowercase).filter(|w| !w.is_empty() && w.len() <= MAX_WORD_BYTES)
}

/// The distinct words an accepted event is indexed under, with its `origin_server_ts`.
fn indexed_words(event: &Pdu) -> Option<(HashSet<String>, u64)> {
    let field = field_of(&event.kind().to_string())?;
    let CanonicalJsonValue::Object(content) = event.object().get("content")? else { return None };
    let CanonicalJsonValue::String(text) = content.get(field)? else { return None };
    let mut words = HashSet::new();
    for word in words_of(text) {
        if words.len() == MAX_WORDS_PER_EVENT {
            break;
        }
        words.insert(word);
    }
    Some((words, u64::from(event.origin_server_ts().get())))
}

/// Adds the search rows of an accepted event at history `order` to its batch.
pub(crate) fn index_event(batch: &mut WriteBatch, room_id: &str, event: &Pdu, order: u64) {
    let Some((words, ts)) = indexed_words(event) else { return };
    let id = event.id().as_str().as_bytes();
    for word in words {
        batch.put(Table::SearchWords, keys::search_word(room_id, &word, ts, order), id.to_vec());
    }
}

/// Deletes the search rows [`index_event`] wrote for `event` (a redaction's batch).
pub(crate) fn unindex_event(batch: &mut WriteBatch, room_id: &str, event: &Pdu, order: u64) {
    let Some((words, ts)) = indexed_words(event) else { return };
    for word in words {
        batch.delete(Table::SearchWords, keys::search_word(room_id, &word, ts, order));
    }
}

/// Where a page ends: the position of the last match returned (recent), or its rank too.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cursor {
    Recent { ts: u64, order: u64 },
    Rank { rank: u64, ts: u64, order: u64 },
}

impl Cursor {
    fn render(self) -> String {
        match self {
            Cursor::Recent { ts, order } => format!("sr1_{ts}_{order}"),
            Cursor::Rank { rank, ts, order } => format!("sk1_{rank}_{ts}_{order}"),
        }
    }

    fn parse(token: &str, order_by: SearchOrder) -> Result<Self, ServiceError> {
        let bad = || ServiceError::InvalidParam(format!("unknown next_batch {token:?}"));
        let number = |part: Option<&str>| part.and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad);
        let mut parts = token.split('_');
        let cursor = match (parts.next(), order_by) {
            (Some("sr1"), SearchOrder::Recent) => {
                Cursor::Recent { ts: number(parts.next())?, order: number(parts.next())? }
            }
            (Some("sk1"), SearchOrder::Rank) => {
                Cursor::Rank { rank: number(parts.next())?, ts: number(parts.next())?, order: number(parts.next())? }
            }
            (Some("sr1" | "sk1"), _) => {
                return Err(ServiceError::InvalidParam(format!(
                    "next_batch {token:?} belongs to a search with another order_by"
                )));
            }
            _ => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(cursor)
    }

    fn position(self) -> (u64, u64) {
        match self {
            Cursor::Recent { ts, order } | Cursor::Rank { ts, order, .. } => (ts, order),
        }
    }
}

/// The parsed query words: full words, and the last one also as a prefix.
struct Terms {
    words: Vec<String>,
}

impl Terms {
    fn parse(term: &str) -> Result<Self, ServiceError> {
        if term.len() > MAX_TERM_BYTES {
            return Err(ServiceError::InvalidParam(format!("search_term is longer than {MAX_TERM_BYTES} bytes")));
        }
        let mut words: Vec<String> = Vec::new();
        for word in words_of(term) {
            if !words.contains(&word) {
                words.push(word);
            }
        }
        if words.len() > MAX_QUERY_WORDS {
            return Err(ServiceError::InvalidParam(format!("search_term may have at most {MAX_QUERY_WORDS} words")));
        }
        Ok(Self { words })
    }

    /// The word whose index rows a search reads, and whether it is read as a prefix: the
    /// longest word but the last, else the last as a prefix.
    fn driving(&self) -> Option<(&str, bool)> {
        let (last, full) = self.words.split_last()?;
        match full.iter().max_by_key(|w| w.chars().count()) {
            Some(word) => Some((word, false)),
            None => Some((last, true)),
        }
    }

    /// The rank of a text with `words` (lowercased, with repeats): `None` unless every query
    /// word is there (the last one maybe as a prefix), else the number of occurrences.
    fn rank(&self, words: &[String]) -> Option<u64> {
        let (last, full) = self.words.split_last()?;
        let mut rank = 0u64;
        for wanted in full {
            let found = words.iter().filter(|w| *w == wanted).count() as u64;
            if found == 0 {
                return None;
            }
            rank += found;
        }
        let found = words.iter().filter(|w| w.starts_with(last.as_str())).count() as u64;
        (found > 0).then_some(rank + found)
    }
}

/// One room's index rows of the driving word, read newest first in chunks.
struct RoomRows {
    room_id: OwnedRoomId,
    prefix: Vec<u8>,
    /// Rows read and not yet handed out, newest first.
    buffered: std::collections::VecDeque<(u64, u64, String)>,
    /// The exclusive upper end of the next read.
    upto: Bound<Vec<u8>>,
    exhausted: bool,
    /// More rows may follow, but the request's row bound is reached.
    out_of_budget: bool,
}

/// A match found and checked.
struct Found {
    room_id: OwnedRoomId,
    event_id: String,
    record: EventRecord,
    sender: String,
    rank: u64,
    ts: u64,
    order: u64,
}

impl Rooms {
    /// `POST /search` with the `room_events` category, for `user_id`: a page of matches, and
    /// `next_batch` when there may be more.
    pub async fn search_room_events(
        &self,
        user_id: &UserId,
        criteria: SearchCriteria,
        next_batch: Option<&str>,
    ) -> Result<Value, ServiceError> {
        let terms = Terms::parse(&criteria.search_term)?;
        let order_by = match criteria.order_by.as_deref() {
            None | Some("rank") => SearchOrder::Rank,
            Some("recent") => SearchOrder::Recent,
            Some(other) => {
                return Err(ServiceError::InvalidParam(format!("order_by must be rank or recent, not {other:?}")));
            }
        };
        let cursor = next_batch.map(|token| Cursor::parse(token, order_by)).transpose()?;
        let kinds = searched_kinds(criteria.keys.as_deref())?;
        let filter = match criteria.filter {
            Some(filter) => EventFilter::from_json(filter)?,
            None => EventFilter::default(),
        };
        let limit = filter.limit.map_or(DEFAULT_SEARCH_LIMIT, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let limit = limit.clamp(1, MAX_SEARCH_LIMIT);
        let group_by = grouping_keys(criteria.groupings.as_ref())?;
        let highlights: Vec<String> = terms.words.clone();
        let Some((driving, as_prefix)) = terms.driving() else {
            return Ok(json!({ "results": [], "count": 0, "highlights": [] }));
        };

        let mut rooms = Vec::new();
        for room_id in self.joined_rooms(user_id).await? {
            if in_list(filter.rooms.as_deref(), &filter.not_rooms, room_id.as_str()) {
                rooms.push(room_id);
            }
        }
        // Recent pages after the first stop at one more match than they return; the first
        // page, and every rank page, look at up to `MAX_CANDIDATES` to count (and rank) them.
        let wanted = match (order_by, cursor) {
            (SearchOrder::Recent, Some(_)) => limit + 1,
            _ => MAX_CANDIDATES,
        };
        let upto = match (order_by, cursor) {
            (SearchOrder::Recent, Some(cursor)) => Some(cursor.position()),
            _ => None,
        };
        let (mut found, scan_stopped) =
            self.collect_matches(user_id, &rooms, (driving, as_prefix), &terms, &kinds, &filter, upto, wanted).await?;
        let counted = found.len();
        let page: Vec<Found> = match order_by {
            SearchOrder::Recent => {
                // Merged newest first already.
                found.truncate(limit);
                found
            }
            SearchOrder::Rank => {
                found.sort_by_key(|f| std::cmp::Reverse((f.rank, f.ts, f.order)));
                let after = |f: &Found| match cursor {
                    Some(Cursor::Rank { rank, ts, order }) => (f.rank, f.ts, f.order) < (rank, ts, order),
                    _ => true,
                };
                found.into_iter().filter(after).take(limit + 1).collect()
            }
        };
        let more = match order_by {
            SearchOrder::Recent => counted > limit || scan_stopped,
            SearchOrder::Rank => page.len() > limit,
        };
        let page: Vec<Found> = page.into_iter().take(limit).collect();
        let next = match (more, page.last()) {
            (true, Some(last)) => Some(match order_by {
                SearchOrder::Recent => Cursor::Recent { ts: last.ts, order: last.order },
                SearchOrder::Rank => Cursor::Rank { rank: last.rank, ts: last.ts, order: last.order },
            }),
            _ => None,
        };

        let mut viewers: HashMap<OwnedRoomId, Viewer> = HashMap::new();
        let mut results = Vec::with_capacity(page.len());
        for found in &page {
            let viewer = viewers.entry(found.room_id.clone()).or_insert_with(|| Viewer::lazy(user_id, &found.room_id));
            let event = self.timeline_event_of(viewer, &found.event_id, &found.record).await?;
            let mut result = json!({ "rank": found.rank, "result": event });
            if let Some(spec) = &criteria.event_context {
                result["context"] = self.search_context(viewer, found, spec).await?;
            }
            results.push(result);
        }
        let mut body = json!({ "results": results, "highlights": highlights });
        // The first page of a recent search and every rank search looked at all matches it
        // could; a later recent page only at its own.
        if wanted == MAX_CANDIDATES {
            body["count"] = json!(counted);
        }
        if let Some(next) = next {
            body["next_batch"] = json!(next.render());
        }
        if !group_by.is_empty() {
            body["groups"] = groups(&page, &group_by);
        }
        if criteria.include_state {
            let mut state = serde_json::Map::new();
            let rooms: BTreeMap<&str, &RoomId> = page.iter().map(|f| (f.room_id.as_str(), &*f.room_id)).collect();
            for (name, room_id) in rooms {
                state.insert(name.to_owned(), Value::Array(self.room_state(user_id, room_id).await?));
            }
            body["state"] = Value::Object(state);
        }
        Ok(body)
    }

    /// Up to `wanted` checked matches in `rooms`, newest first, below `upto` when given; and
    /// whether the scan stopped at its row bound with rows left.
    #[allow(clippy::too_many_arguments)]
    async fn collect_matches(
        &self,
        user_id: &UserId,
        rooms: &[OwnedRoomId],
        (driving, as_prefix): (&str, bool),
        terms: &Terms,
        kinds: &[&str],
        filter: &EventFilter,
        upto: Option<(u64, u64)>,
        wanted: usize,
    ) -> Result<(Vec<Found>, bool), ServiceError> {
        let mut sources: Vec<RoomRows> = rooms
            .iter()
            .map(|room_id| {
                let prefix = match as_prefix {
                    // `room\0` then the word's bytes: every word that starts with it.
                    true => [keys::room_rows(room_id.as_str()), driving.as_bytes().to_vec()].concat(),
                    false => keys::search_word_rows(room_id.as_str(), driving),
                };
                let upto = match (upto, as_prefix) {
                    (Some((ts, order)), false) => {
                        Bound::Excluded(keys::search_word(room_id.as_str(), driving, ts, order))
                    }
                    _ => KeyRange::prefix(&prefix).end,
                };
                RoomRows {
                    room_id: room_id.clone(),
                    prefix,
                    buffered: Default::default(),
                    upto,
                    exhausted: false,
                    out_of_budget: false,
                }
            })
            .collect();
        let mut scanned = 0usize;
        // Rows a prefix read left unread for the bound.
        let mut truncated = false;
        // A prefix read is ordered by word first: read each room's rows whole (within the
        // bound) and order them by position.
        if as_prefix {
            for source in &mut sources {
                source.exhausted = true;
                let budget = MAX_ROWS_SCANNED.saturating_sub(scanned);
                if budget == 0 {
                    truncated = true;
                    continue;
                }
                let range = KeyRange::prefix(&source.prefix);
                let rows = self.kv.scan(Table::SearchWords, &range, Direction::Forward, budget).await?;
                scanned += rows.len();
                truncated |= rows.len() == budget;
                let mut decoded: Vec<(u64, u64, String)> = rows.into_iter().filter_map(decode_row).collect();
                if let Some(upto) = upto {
                    decoded.retain(|(ts, order, _)| (*ts, *order) < upto);
                }
                decoded.sort_unstable_by_key(|row| std::cmp::Reverse((row.0, row.1)));
                decoded.dedup_by(|a, b| a.2 == b.2);
                source.buffered = decoded.into();
            }
        }
        let mut heap = BinaryHeap::new();
        for (index, source) in sources.iter_mut().enumerate() {
            if let Some(head) = self.next_row(source, &mut scanned).await? {
                heap.push((head.0, head.1, index, head.2));
            }
        }
        let mut viewers: HashMap<usize, Viewer> = HashMap::new();
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        while let Some((ts, order, index, event_id)) = heap.pop() {
            let source = &mut sources[index];
            if let Some(next) = self.next_row(source, &mut scanned).await? {
                heap.push((next.0, next.1, index, next.2));
            }
            // A room whose next rows are beyond the bound may hold rows newer than the
            // other rooms' next ones: the merge stops after this row, and the next page goes on.
            let stop = source.out_of_budget;
            let room_id = source.room_id.clone();
            if seen.insert(event_id.clone()) {
                let viewer = viewers.entry(index).or_insert_with(|| Viewer::lazy(user_id, &room_id));
                let checked = self.check_match(viewer, &event_id, terms, kinds, filter, (ts, order)).await?;
                if let Some(found_one) = checked {
                    found.push(found_one);
                    if found.len() == wanted {
                        return Ok((found, !heap.is_empty() || truncated || stop));
                    }
                }
            }
            if stop {
                return Ok((found, true));
            }
        }
        Ok((found, truncated))
    }

    /// The next row of one room's index, reading another chunk when the buffer is empty.
    async fn next_row(
        &self,
        source: &mut RoomRows,
        scanned: &mut usize,
    ) -> Result<Option<(u64, u64, String)>, ServiceError> {
        if source.buffered.is_empty() && !source.exhausted {
            let chunk = ROOM_CHUNK.min(MAX_ROWS_SCANNED.saturating_sub(*scanned));
            if chunk == 0 {
                source.out_of_budget = true;
                return Ok(None);
            }
            let range = KeyRange { start: Bound::Included(source.prefix.clone()), end: source.upto.clone() };
            let rows = self.kv.scan(Table::SearchWords, &range, Direction::Backward, chunk).await?;
            *scanned += rows.len();
            source.exhausted = rows.len() < chunk;
            if let Some((last, _)) = rows.last() {
                source.upto = Bound::Excluded(last.clone());
            }
            source.buffered = rows.into_iter().filter_map(decode_row).collect();
        }
        Ok(source.buffered.pop_front())
    }

    /// The match at `event_id`, if the stored event has every word in a searched field, passes
    /// the filter, and the viewer may see it.
    async fn check_match(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
        terms: &Terms,
        kinds: &[&str],
        filter: &EventFilter,
        (ts, order): (u64, u64),
    ) -> Result<Option<Found>, ServiceError> {
        let Some(record) = self.event_record(event_id).await? else { return Ok(None) };
        if record.status != EventStatus::Accepted || record.redacted_by.is_some() {
            return Ok(None);
        }
        let event: Value = serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let kind = event["type"].as_str().unwrap_or_default();
        if !kinds.contains(&kind) || !filter.allows(&event) {
            return Ok(None);
        }
        let Some(text) = field_of(kind).and_then(|field| event["content"][field].as_str()) else { return Ok(None) };
        let words: Vec<String> = words_of(text).collect();
        let Some(rank) = terms.rank(&words) else { return Ok(None) };
        if !self.may_see(viewer, event_id, &record).await? {
            return Ok(None);
        }
        let sender = event["sender"].as_str().unwrap_or_default().to_owned();
        Ok(Some(Found {
            room_id: viewer.room_id.clone(),
            event_id: event_id.to_owned(),
            record,
            sender,
            rank,
            ts,
            order,
        }))
    }

    /// A result's `context`: the events before and after it that the viewer may see, the
    /// tokens `/messages` continues with, and the senders' profiles when asked.
    async fn search_context(
        &self,
        viewer: &mut Viewer,
        found: &Found,
        spec: &ContextSpec,
    ) -> Result<Value, ServiceError> {
        let before = usize::try_from(spec.before_limit).unwrap_or(usize::MAX).min(MAX_CONTEXT_LIMIT);
        let after = usize::try_from(spec.after_limit).unwrap_or(usize::MAX).min(MAX_CONTEXT_LIMIT);
        let side = self.context_sides(viewer, &found.record, before, after).await?;
        let mut context = json!({
            "events_before": side.before,
            "events_after": side.after,
            "start": side.start,
            "end": side.end,
        });
        if spec.include_profile {
            let senders: BTreeMap<&str, ()> = side
                .before
                .iter()
                .chain(&side.after)
                .filter_map(|e| e["sender"].as_str())
                .chain([found.sender.as_str()])
                .map(|s| (s, ()))
                .collect();
            let mut profiles = serde_json::Map::new();
            for sender in senders.keys() {
                let key = keys::current_state(viewer.room_id.as_str(), "m.room.member", sender);
                let Some(id) = self.kv.get(Table::CurrentState, &key).await? else { continue };
                let Some(member) = self.event_record(&String::from_utf8_lossy(&id)).await? else { continue };
                let member: Value =
                    serde_json::from_str(&member.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
                let mut profile = serde_json::Map::new();
                for field in ["displayname", "avatar_url"] {
                    if let Some(value) = member["content"][field].as_str() {
                        profile.insert(field.into(), json!(value));
                    }
                }
                profiles.insert((*sender).to_owned(), Value::Object(profile));
            }
            context["profile_info"] = Value::Object(profiles);
        }
        Ok(context)
    }
}

/// `(ts, order, event ID)` of a `search_words` row.
fn decode_row((key, value): (Vec<u8>, Vec<u8>)) -> Option<(u64, u64, String)> {
    let (ts, order) = keys::depth_and_order_of(&key)?;
    Some((ts, order, String::from_utf8(value).ok()?))
}

/// The event types the request's `keys` search (all three when absent).
fn searched_kinds(keys: Option<&[String]>) -> Result<Vec<&'static str>, ServiceError> {
    let Some(keys) = keys else { return Ok(SEARCHABLE.iter().map(|(kind, _, _)| *kind).collect()) };
    let mut kinds = Vec::new();
    for key in keys {
        let Some((kind, _, _)) = SEARCHABLE.iter().find(|(_, _, name)| name == key) else {
            return Err(ServiceError::InvalidParam(format!(
                "unknown search key {key:?}: content.body, content.name and content.topic are searchable"
            )));
        };
        if !kinds.contains(kind) {
            kinds.push(*kind);
        }
    }
    Ok(kinds)
}

/// The grouping keys asked for: `room_id` and `sender`.
fn grouping_keys(groupings: Option<&Groupings>) -> Result<Vec<&'static str>, ServiceError> {
    let mut keys = Vec::new();
    for grouping in groupings.map(|g| g.group_by.as_slice()).unwrap_or_default() {
        let key = match grouping.key.as_deref() {
            Some("room_id") => "room_id",
            Some("sender") => "sender",
            None => continue,
            Some(other) => {
                return Err(ServiceError::InvalidParam(format!(
                    "unknown grouping key {other:?}: results group by room_id or sender"
                )));
            }
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// `groups`: for each key, each value's results on this page, in page order; `order` ranks the
/// groups by their first result.
fn groups(page: &[Found], group_by: &[&str]) -> Value {
    let mut all = serde_json::Map::new();
    for key in group_by {
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for found in page {
            let value = match *key {
                "room_id" => found.room_id.to_string(),
                _ => found.sender.clone(),
            };
            match groups.iter_mut().find(|(v, _)| *v == value) {
                Some((_, results)) => results.push(&found.event_id),
                None => groups.push((value, vec![&found.event_id])),
            }
        }
        let map: serde_json::Map<String, Value> = groups
            .into_iter()
            .enumerate()
            .map(|(order, (value, results))| (value, json!({ "results": results, "order": order + 1 })))
            .collect();
        all.insert((*key).to_owned(), Value::Object(map));
    }
    Value::Object(all)
}

/// `allowed` (when given) must hold `value` and `denied` must not.
fn in_list(allowed: Option<&[String]>, denied: &[String], value: &str) -> bool {
    allowed.is_none_or(|list| list.iter().any(|v| v == value)) && !denied.iter().any(|v| v == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_unicode_lowercased() {
        let words: Vec<String> = words_of("Hello, WORLD! Grüße, don't 東京 café_au-lait").collect();
        assert_eq!(words, ["hello", "world", "grüße", "don't", "東", "京", "café_au", "lait"]);
    }

    #[test]
    fn every_word_must_match_and_the_last_as_a_prefix() {
        let terms = Terms::parse("Quick BRO").unwrap();
        let text: Vec<String> = words_of("the quick brown fox, quick!").collect();
        assert_eq!(terms.rank(&text), Some(3));
        let other: Vec<String> = words_of("a quick red fox").collect();
        assert_eq!(terms.rank(&other), None);
        assert_eq!(terms.driving(), Some(("quick", false)));
        assert_eq!(Terms::parse("hel").unwrap().driving(), Some(("hel", true)));
        assert!(Terms::parse(&"w ".repeat(MAX_QUERY_WORDS + 1)).is_ok(), "repeated words count once");
        let many: String = (0..=MAX_QUERY_WORDS).map(|i| format!("w{i} ")).collect();
        assert!(matches!(Terms::parse(&many), Err(ServiceError::InvalidParam(_))));
    }

    #[test]
    fn tokens_round_trip_and_bind_to_their_order() {
        let recent = Cursor::Recent { ts: 5, order: 9 };
        assert_eq!(Cursor::parse(&recent.render(), SearchOrder::Recent).unwrap(), recent);
        let rank = Cursor::Rank { rank: 2, ts: 5, order: 9 };
        assert_eq!(Cursor::parse(&rank.render(), SearchOrder::Rank).unwrap(), rank);
        for bad in ["", "sr1", "sr1_1", "sr1_1_2_3", "x_1_2", "sr1_a_2"] {
            assert!(Cursor::parse(bad, SearchOrder::Recent).is_err(), "{bad}");
        }
        assert!(Cursor::parse(&recent.render(), SearchOrder::Rank).is_err());
    }
}
