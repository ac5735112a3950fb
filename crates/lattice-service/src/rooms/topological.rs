//! A room's history in topological order: events sorted by `depth`, their `order` (the stream
//! counter value they were stored with) breaking ties. History reads (`/messages`, `/context`,
//! `prev_batch`, `/relations`) page over this order, so an event that arrives late with a low
//! depth sorts where the room graph puts it; `/sync` keeps the arrival order of the timeline
//! table, the exactly-once log of what became visible.
//!
//! Pagination tokens name a point between events: `t{depth}_{order}` is just after the event at
//! that position. `/sync` tokens (`s{position}`) are accepted too: they stand for the room's last
//! event with a stream position at or before theirs.

use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_storage::records::EventRecord;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::{RoomId, UInt};
use serde::Deserialize;
use serde_json::Value;

use super::Rooms;
use super::visibility::Viewer;
use crate::ServiceError;

/// Adds the topological-index row of an event that joins its room's history (accepted, not an
/// outlier) at `order` to its batch.
pub(crate) fn index_topological(batch: &mut WriteBatch, room_id: &RoomId, event: &Pdu, order: u64) {
    batch.put(
        Table::Topological,
        keys::topological(room_id.as_str(), depth_of(event.depth()), order),
        event.id().as_str().as_bytes().to_vec(),
    );
}

/// A PDU's depth as it sorts: the spec bounds it to `0..=2^63-1`.
pub(crate) fn depth_of(depth: UInt) -> u64 {
    u64::from(depth).min(i64::MAX as u64)
}

/// A position in a room's topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopoPos {
    pub depth: u64,
    pub order: u64,
}

impl TopoPos {
    /// Before every event: orders come from the stream counter, which starts at 1.
    pub const START: TopoPos = TopoPos { depth: 0, order: 0 };

    /// The position just before this one, so that a backward page that ended on an event does
    /// not return it again.
    pub fn before(self) -> TopoPos {
        match (self.order.checked_sub(1), self.depth.checked_sub(1)) {
            (Some(order), _) => TopoPos { depth: self.depth, order },
            (None, Some(depth)) => TopoPos { depth, order: u64::MAX },
            (None, None) => TopoPos::START,
        }
    }

    pub fn render(self) -> String {
        format!("t{}_{}", self.depth, self.order)
    }

    pub(crate) fn key(self, room_id: &RoomId) -> Vec<u8> {
        keys::topological(room_id.as_str(), self.depth, self.order)
    }

    /// The position at the end of a topological or relation key.
    pub(crate) fn of_key(key: &[u8]) -> TopoPos {
        let (depth, order) = keys::depth_and_order_of(key).unwrap_or((0, 0));
        TopoPos { depth, order }
    }
}

/// A pagination token as a client hands it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryToken {
    /// A `/sync` token (`s…`): a stream position.
    Stream(u64),
    /// A history token (`t{depth}_{order}`).
    Topological(TopoPos),
}

impl HistoryToken {
    pub fn parse(token: &str) -> Result<Self, ServiceError> {
        let invalid = || ServiceError::InvalidParam(format!("invalid pagination token {token:?}"));
        // A `/sync` token (`m…`, or `s…` of the single shared stream) stands for its events position.
        if token.starts_with(['s', 'm']) {
            return crate::sync::parse_token(token).map(HistoryToken::Stream).map_err(|_| invalid());
        }
        let rest = token.strip_prefix('t').ok_or_else(invalid)?;
        let (depth, order) = rest.split_once('_').ok_or_else(invalid)?;
        let number = |text: &str| match text.bytes().all(|b| b.is_ascii_digit()) {
            true => text.parse::<u64>().map_err(|_| invalid()),
            false => Err(invalid()),
        };
        Ok(HistoryToken::Topological(TopoPos { depth: number(depth)?, order: number(order)? }))
    }
}

/// One page of `/messages`: the spec's response body and, for a backward page that reached a
/// gap in the stored history, where the gap is, so federation can backfill it and page again.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPage {
    pub response: Value,
    pub gap: Option<HistoryGap>,
}

/// Prev events the stored history lacks (backward extremities) and the token that continues
/// backward from the event that cites them: once they are backfilled, a page from `token` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryGap {
    pub missing: Vec<String>,
    pub token: String,
}

/// The parts of a stored event its history position and gaps are read from.
#[derive(Deserialize)]
struct GraphFields {
    #[serde(default)]
    depth: i64,
    #[serde(default)]
    prev_events: Vec<Value>,
}

impl GraphFields {
    fn parse(record: &EventRecord) -> Result<Self, ServiceError> {
        serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// Prev event IDs: v1 and v2 cite `[id, hashes]` pairs, later versions plain IDs.
    fn prev_ids(&self) -> impl Iterator<Item = &str> {
        self.prev_events.iter().filter_map(|prev| prev.as_str().or_else(|| prev[0].as_str()))
    }
}

/// Where a stored event sits in its room's history; `None` when it is not part of it (an
/// outlier, or an event that was not accepted).
pub(crate) fn history_position(record: &EventRecord) -> Result<Option<TopoPos>, ServiceError> {
    let Some(order) = record.history_order() else { return Ok(None) };
    let depth = GraphFields::parse(record)?.depth.max(0) as u64;
    Ok(Some(TopoPos { depth, order }))
}

impl Rooms {
    /// The position a token stands for in `room_id`'s history. A `/sync` token stands for the
    /// room's last event with a stream position at or before it (one timeline row), or the
    /// start when there is none.
    pub(crate) async fn history_point(&self, room_id: &RoomId, token: HistoryToken) -> Result<TopoPos, ServiceError> {
        let position = match token {
            HistoryToken::Topological(pos) => return Ok(pos),
            HistoryToken::Stream(position) => position,
        };
        let room = room_id.as_str();
        let range = KeyRange::between(&keys::timeline(room, 0), &keys::timeline(room, position.saturating_add(1)));
        let Some((_, event_id)) = self.kv.scan(Table::Timeline, &range, Direction::Backward, 1).await?.pop() else {
            return Ok(TopoPos::START);
        };
        let event_id = String::from_utf8_lossy(&event_id);
        let record = self
            .event_record(&event_id)
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("timeline event {event_id} is not stored")))?;
        Ok(history_position(&record)?.unwrap_or(TopoPos::START))
    }

    /// The position of the room's last event in topological order (the start when it has none).
    pub(crate) async fn history_end(&self, room_id: &RoomId) -> Result<TopoPos, ServiceError> {
        let rows = KeyRange::prefix(&keys::room_rows(room_id.as_str()));
        let last = self.kv.scan(Table::Topological, &rows, Direction::Backward, 1).await?;
        Ok(last.first().map_or(TopoPos::START, |(key, _)| TopoPos::of_key(key)))
    }

    /// The events of the room's history in `(after, upto]` (`None`: unbounded), in `direction`.
    pub(crate) async fn history_rows(
        &self,
        room_id: &RoomId,
        (after, upto): (Option<TopoPos>, Option<TopoPos>),
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(TopoPos, String)>, ServiceError> {
        let room_rows = KeyRange::prefix(&keys::room_rows(room_id.as_str()));
        let range = KeyRange {
            start: after.map_or(room_rows.start, |pos| Bound::Excluded(pos.key(room_id))),
            end: upto.map_or(room_rows.end, |pos| Bound::Included(pos.key(room_id))),
        };
        if range.is_inverted() {
            return Ok(Vec::new());
        }
        let rows = self.kv.scan(Table::Topological, &range, direction, limit).await?;
        Ok(rows
            .into_iter()
            .map(|(key, id)| (TopoPos::of_key(&key), String::from_utf8_lossy(&id).into_owned()))
            .collect())
    }

    /// Whether `viewer` may see an event read from a history index. Unlike a timeline row's
    /// stream position, an index row's order says nothing about when a backfilled event
    /// happened, so the stored record decides.
    pub(crate) async fn may_see_in_history(&self, viewer: &mut Viewer, event_id: &str) -> Result<bool, ServiceError> {
        self.may_see_id(viewer, event_id).await
    }

    /// An event of a history index as `viewer` sees it in a timeline, or `None` when they may
    /// not see it ([`Rooms::may_see_in_history`]); its record is read once for both.
    pub(crate) async fn history_event(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
    ) -> Result<Option<Value>, ServiceError> {
        let Some(record) = self.event_record(event_id).await? else { return Ok(None) };
        self.history_event_of(viewer, event_id, &record).await
    }

    /// [`Rooms::history_event`] for a record the caller has already read.
    pub(crate) async fn history_event_of(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
        record: &EventRecord,
    ) -> Result<Option<Value>, ServiceError> {
        if !self.may_see(viewer, event_id, record).await? {
            return Ok(None);
        }
        Ok(Some(self.timeline_event_of(viewer, event_id, record).await?))
    }

    /// Whether the room has any recorded gap: most rooms have none, and then a page needs no
    /// per-event look at prev events.
    pub(crate) async fn room_has_gaps(&self, room_id: &RoomId) -> Result<bool, ServiceError> {
        let rows = KeyRange::prefix(&keys::room_rows(room_id.as_str()));
        Ok(!self.kv.scan(Table::BackwardExtremities, &rows, Direction::Forward, 1).await?.is_empty())
    }

    /// The gaps cited by the first event of the room's history after `position` (the last
    /// event a backward page from `position` continues below).
    pub(crate) async fn missing_prevs_above(
        &self,
        room_id: &RoomId,
        position: TopoPos,
    ) -> Result<Vec<String>, ServiceError> {
        let Some((_, event_id)) =
            self.history_rows(room_id, (Some(position), None), Direction::Forward, 1).await?.pop()
        else {
            return Ok(Vec::new());
        };
        match self.event_record(&event_id).await? {
            Some(record) => self.missing_prevs(room_id, &record).await,
            None => Ok(Vec::new()),
        }
    }

    /// The prev events of an event (its stored record) that are recorded as missing (backward
    /// extremities).
    pub(crate) async fn missing_prevs(
        &self,
        room_id: &RoomId,
        record: &EventRecord,
    ) -> Result<Vec<String>, ServiceError> {
        let fields = GraphFields::parse(record)?;
        let mut missing = Vec::new();
        for prev in fields.prev_ids() {
            let key = keys::backward_extremity(room_id.as_str(), prev);
            if self.kv.get(Table::BackwardExtremities, &key).await?.is_some() {
                missing.push(prev.to_owned());
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_tokens_parse_both_formats_and_refuse_the_rest() {
        assert_eq!(HistoryToken::parse("s42").unwrap(), HistoryToken::Stream(42));
        assert_eq!(HistoryToken::parse("s42_40").unwrap(), HistoryToken::Stream(42));
        let pos = TopoPos { depth: 7, order: 300 };
        assert_eq!(HistoryToken::parse(&pos.render()).unwrap(), HistoryToken::Topological(pos));
        for bad in
            ["", "t", "t1", "t1_", "t_1", "t-1_2", "t+1_2", "t1_2_3", "tx_1", "s", "x1_2", "t99999999999999999999_1"]
        {
            assert!(matches!(HistoryToken::parse(bad), Err(ServiceError::InvalidParam(_))), "{bad}");
        }
    }

    #[test]
    fn the_position_before_steps_back_across_depths() {
        assert_eq!(TopoPos { depth: 3, order: 9 }.before(), TopoPos { depth: 3, order: 8 });
        assert_eq!(TopoPos { depth: 3, order: 0 }.before(), TopoPos { depth: 2, order: u64::MAX });
        assert_eq!(TopoPos::START.before(), TopoPos::START);
        assert!(TopoPos { depth: 3, order: 0 }.before() < TopoPos { depth: 3, order: 0 });
    }
}
