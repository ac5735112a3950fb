//! Reports of events, rooms and users (spec: "Reporting content"), kept for the server's
//! operators, who read them with `lattice report list`. The reports service owns the `reports`
//! table; the checks that need rooms or accounts (may the reporter see the event?) are the
//! composer's, in the `impl Service` below.

use std::sync::Arc;

use lattice_core::limits::MAX_REPORT_REASON_BYTES;
use lattice_storage::records::ReportRecord;
use lattice_storage::{Direction, KeyRange, KvStore, ScopedStore, StorageError, Table, TableScope, WriteBatch, keys};
use ruma::{RoomId, UserId};

use crate::{Clock, Service, ServiceError};

/// `counters` holds the report numbers (`report`).
pub(crate) const TABLES: TableScope = TableScope { owner: "reports", tables: &[Table::Reports, Table::Counters] };

/// A stored report, as operators see it.
pub type Report = ReportRecord;

/// The scores the spec allows: -100 (most offensive) to 0 (inoffensive).
const SCORE_RANGE: std::ops::RangeInclusive<i64> = -100..=0;
/// How often storing a report is retried when another report takes the same number.
const REPORT_WRITE_RETRIES: usize = 16;

/// What a report is about.
pub(crate) enum Target<'a> {
    Event { room_id: &'a RoomId, event_id: &'a str, score: Option<i64> },
    Room(&'a RoomId),
    User(&'a UserId),
}

fn check_reason(reason: Option<&str>) -> Result<(), ServiceError> {
    if reason.is_some_and(|r| r.len() > MAX_REPORT_REASON_BYTES) {
        return Err(ServiceError::InvalidParam(format!("reason must be at most {MAX_REPORT_REASON_BYTES} bytes")));
    }
    Ok(())
}

impl Service {
    /// `POST /rooms/{roomId}/report/{eventId}`: the reporter must be joined to the room and the
    /// event visible in it; otherwise `M_NOT_FOUND`, as the spec asks (no hint which it was).
    pub async fn report_event(
        &self,
        reporter: &UserId,
        room_id: &RoomId,
        event_id: &str,
        reason: Option<String>,
        score: Option<i64>,
    ) -> Result<u64, ServiceError> {
        if score.is_some_and(|s| !SCORE_RANGE.contains(&s)) {
            return Err(ServiceError::InvalidParam("score must be between -100 and 0".into()));
        }
        check_reason(reason.as_deref())?;
        let not_found = || ServiceError::NotFound(format!("no event {event_id} in a room you are joined to"));
        if self.rooms.membership(reporter, room_id).await?.as_deref() != Some("join") {
            return Err(not_found());
        }
        match self.rooms.require_visible(reporter, room_id, event_id).await {
            Err(ServiceError::NotFound(_)) => return Err(not_found()),
            other => other?,
        }
        self.reports.store(reporter, Target::Event { room_id, event_id, score }, reason).await
    }

    /// `POST /rooms/{roomId}/report`: any room this server knows; the reporter need not be in it.
    pub async fn report_room(
        &self,
        reporter: &UserId,
        room_id: &RoomId,
        reason: Option<String>,
    ) -> Result<u64, ServiceError> {
        check_reason(reason.as_deref())?;
        self.rooms.room_version(room_id).await?;
        self.reports.store(reporter, Target::Room(room_id), reason).await
    }

    /// `POST /users/{userId}/report`: any account of this server (remote users are unknown to it
    /// until federation exists).
    pub async fn report_user(
        &self,
        reporter: &UserId,
        user_id: &UserId,
        reason: Option<String>,
    ) -> Result<u64, ServiceError> {
        check_reason(reason.as_deref())?;
        if self.accounts.user_record(user_id).await?.is_none() {
            return Err(ServiceError::NotFound(format!("no such user {user_id}")));
        }
        self.reports.store(reporter, Target::User(user_id), reason).await
    }
}

pub struct Reports {
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
}

impl Reports {
    pub(crate) fn new(kv: Arc<dyn KvStore>, clock: Arc<dyn Clock>) -> Self {
        Self { kv: ScopedStore::new(kv, TABLES), clock }
    }

    /// Stores a report under the next report number; number and report commit together.
    pub(crate) async fn store(
        &self,
        reporter: &UserId,
        target: Target<'_>,
        reason: Option<String>,
    ) -> Result<u64, ServiceError> {
        let mut record = ReportRecord {
            id: 0,
            received_ms: self.clock.now_ms(),
            reporter: reporter.to_string(),
            room_id: None,
            event_id: None,
            user_id: None,
            reason,
            score: None,
        };
        match target {
            Target::Event { room_id, event_id, score } => {
                record.room_id = Some(room_id.to_string());
                record.event_id = Some(event_id.to_owned());
                record.score = score;
            }
            Target::Room(room_id) => record.room_id = Some(room_id.to_string()),
            Target::User(user_id) => record.user_id = Some(user_id.to_string()),
        }
        for _ in 0..REPORT_WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            record.id = lattice_storage::counter_in_batch(self.kv.as_ref(), &mut batch, "report").await?;
            lattice_storage::put(&mut batch, keys::report(record.id), &record);
            match self.kv.write(batch).await {
                Ok(()) => {
                    tracing::info!(report = record.id, reporter = %reporter, "content reported");
                    return Ok(record.id);
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many reports at once; try again".into()))
    }

    /// The newest `limit` reports, newest first (for operators).
    pub async fn list(&self, limit: usize) -> Result<Vec<Report>, ServiceError> {
        let limit = limit.min(lattice_storage::MAX_SCAN_ROWS);
        let rows = self.kv.scan(Table::Reports, &KeyRange::all(), Direction::Backward, limit).await?;
        rows.into_iter()
            .map(|(_, raw)| serde_json::from_slice(&raw).map_err(|e| ServiceError::Internal(e.to_string())))
            .collect()
    }
}
