//! `/messages`: pages of a room's history in topological order, and the timeline helpers the
//! sync service shares with it (the page limit, which events reach a client).

use std::collections::{BTreeSet, HashSet};

use lattice_storage::{Direction, Table, keys};
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use super::filter::EventFilter;
use super::topological::{HistoryGap, HistoryPage, HistoryToken, TopoPos};
use super::visibility::{MAX_HIDDEN_RUN, StateView};
use crate::ServiceError;

/// Most timeline events one room gets in one sync or one page of `/messages`.
pub const MAX_TIMELINE_LIMIT: usize = 1_000;
/// Most timeline rows one room's page looks at while a filter skips events.
pub(crate) const MAX_FILTERED_SCAN: usize = lattice_storage::MAX_SCAN_ROWS;

impl Rooms {
    /// `GET /rooms/{roomId}/messages`: a page of the room's history in topological order,
    /// before (`backward`) or after `from`, not past `to`, as `filter` allows; with lazy
    /// loading, the senders' member events in `state`. A backward page stops at the first event
    /// that cites a prev event recorded as missing, and says so in [`HistoryPage::gap`].
    pub async fn messages(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        (from, to): (Option<HistoryToken>, Option<HistoryToken>),
        backward: bool,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<HistoryPage, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let limit = limit.clamp(1, MAX_TIMELINE_LIMIT);
        let from_given = from.is_some();
        let from = match from {
            Some(token) => self.history_point(room_id, token).await?,
            None if backward => self.history_end(room_id).await?,
            None => TopoPos::START,
        };
        let to = match to {
            Some(token) => Some(self.history_point(room_id, token).await?),
            None => None,
        };
        let ignored = self.account_data.ignored_users(user_id).await?;
        let gaps_possible = backward && self.room_has_gaps(room_id).await?;
        // The event the client saw last (just above `from`) may cite a gap that the page which
        // returned it could not fill (a second gap in one page, a server that did not answer):
        // it is reported again, or its history would be skipped for good.
        let boundary_missing = match (gaps_possible, from_given) {
            (true, true) => self.missing_prevs_above(room_id, from).await?,
            _ => Vec::new(),
        };
        // Tokens name the last position a client has seen: backward pages hold positions ≤ from,
        // forward pages positions > from.
        let mut cursor = from;
        let mut chunk = Vec::with_capacity(limit);
        let mut gap = None;
        let mut scanned = 0;
        let mut hidden_run = 0;
        let mut exhausted = false;
        while chunk.len() < limit
            && scanned < MAX_FILTERED_SCAN
            && hidden_run < MAX_HIDDEN_RUN
            && !exhausted
            && gap.is_none()
        {
            let (bounds, direction) = if backward {
                ((to, Some(cursor)), Direction::Backward)
            } else {
                ((Some(cursor), to), Direction::Forward)
            };
            let want = limit - chunk.len();
            let rows = self.history_rows(room_id, bounds, direction, want).await?;
            exhausted = rows.len() < want;
            scanned += rows.len();
            for (position, event_id) in rows {
                cursor = if backward { position.before() } else { position };
                // One read of the record serves both the visibility check and the gap check.
                let Some(record) = self.event_record(&event_id).await? else {
                    hidden_run += 1;
                    continue;
                };
                match self.history_event_of(viewer, &event_id, &record).await? {
                    Some(event) => {
                        hidden_run = 0;
                        if visible(&event, filter, &ignored) {
                            chunk.push(event);
                        }
                    }
                    None => hidden_run += 1,
                }
                if gaps_possible {
                    let missing = self.missing_prevs(room_id, &record).await?;
                    if !missing.is_empty() {
                        gap = Some(HistoryGap { missing, token: cursor.render() });
                        break;
                    }
                }
            }
        }
        let mut page = json!({ "chunk": chunk, "start": from.render() });
        if !exhausted || gap.is_some() {
            page["end"] = json!(cursor.render());
        }
        if !boundary_missing.is_empty() {
            let gap = gap.get_or_insert_with(|| HistoryGap { missing: Vec::new(), token: cursor.render() });
            for missing in boundary_missing {
                if !gap.missing.contains(&missing) {
                    gap.missing.push(missing);
                }
            }
        }
        if filter.lazy_load_members {
            let at = self.state_view(viewer).await?;
            page["state"] = json!(self.members_of_senders(room_id, at, &chunk).await?);
        }
        Ok(HistoryPage { response: page, gap })
    }

    /// The member events of the senders of `events` in the state the reader may read (the
    /// current state, or the state at their leave), for lazy-loading clients.
    pub(crate) async fn members_of_senders(
        &self,
        room_id: &RoomId,
        at: StateView,
        events: &[Value],
    ) -> Result<Vec<Value>, ServiceError> {
        let senders: BTreeSet<&str> = events.iter().filter_map(|e| e["sender"].as_str()).collect();
        let mut members = Vec::with_capacity(senders.len());
        for sender in senders {
            let id = match at {
                StateView::Current => {
                    let key = keys::current_state(room_id.as_str(), "m.room.member", sender);
                    self.kv.get(Table::CurrentState, &key).await?.map(|id| String::from_utf8_lossy(&id).into_owned())
                }
                StateView::AtGroup(group) => {
                    let slots = [("m.room.member", sender)];
                    super::state_store::lookup(self.kv.as_ref(), group, &slots).await?.pop().flatten()
                }
            };
            if let Some(id) = id {
                members.push(self.client_event(&id).await?);
            }
        }
        Ok(members)
    }
}

/// Whether a timeline event reaches the client: it passes the filter, and it is not a message
/// from an ignored user (their state events still shape the room, so those stay).
pub(crate) fn visible(event: &Value, filter: &EventFilter, ignored: &HashSet<String>) -> bool {
    let ignored_sender =
        ignored.contains(event["sender"].as_str().unwrap_or_default()) && event.get("state_key").is_none();
    !ignored_sender && filter.allows(event)
}

/// The stream position that ends a timeline (or relation, or thread-activity) key.
pub(crate) fn position_of(timeline_key: &[u8]) -> u64 {
    keys::trailing_position(timeline_key).unwrap_or(0)
}
