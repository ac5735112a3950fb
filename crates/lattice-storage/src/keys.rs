//! Key encoding for every table, in one place.
//!
//! Composite keys join their parts with a 0x00 byte. Matrix user IDs, room IDs and event types
//! never contain NUL (they are validated at the edge), so a prefix scan over `user\0` finds
//! exactly one user's rows. The last part of a key may hold any bytes. Numbers are big-endian
//! so that byte order is numeric order.

const SEPARATOR: u8 = 0;

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len() + 1).sum();
    let mut key = Vec::with_capacity(len);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(SEPARATOR);
        }
        key.extend_from_slice(part);
    }
    key
}

pub fn user(user_id: &str) -> Vec<u8> {
    user_id.as_bytes().to_vec()
}

/// The prefix of every per-user row keyed `user\0…`.
pub fn user_rows(user_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), b""])
}

pub fn device(user_id: &str, device_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes()])
}

/// Global account data uses an empty room part; per-room data (later) the room ID.
pub fn account_data(user_id: &str, room_id: Option<&str>, event_type: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.unwrap_or("").as_bytes(), event_type.as_bytes()])
}

pub fn filter(user_id: &str, filter_id: u64) -> Vec<u8> {
    join(&[user_id.as_bytes(), &filter_id.to_be_bytes()])
}

/// Tokens are looked up by the hex of their SHA-256, never by the secret itself.
pub fn token(hash_hex: &str) -> Vec<u8> {
    hash_hex.as_bytes().to_vec()
}

pub fn registration_token(token: &str) -> Vec<u8> {
    token.as_bytes().to_vec()
}

pub fn uia_session(session_id: &str) -> Vec<u8> {
    session_id.as_bytes().to_vec()
}

pub fn room(room_id: &str) -> Vec<u8> {
    room_id.as_bytes().to_vec()
}

pub fn event(event_id: &str) -> Vec<u8> {
    event_id.as_bytes().to_vec()
}

/// A room's timeline in stream order: `room\0position`.
pub fn timeline(room_id: &str, position: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &position.to_be_bytes()])
}

/// The prefix of every per-room row keyed `room\0…`.
pub fn room_rows(room_id: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), b""])
}

pub fn state_group(group: u64) -> Vec<u8> {
    group.to_be_bytes().to_vec()
}

/// `room\0type\0state_key`: state keys may hold any bytes, so they come last.
pub fn current_state(room_id: &str, event_type: &str, state_key: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), event_type.as_bytes(), state_key.as_bytes()])
}

/// `user\0room`: the rooms a user is in, found with one prefix scan.
pub fn membership(user_id: &str, room_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.as_bytes()])
}

/// `target\0redaction`: redactions accepted before the event they redact arrived.
pub fn pending_redaction(target_id: &str, redaction_id: &str) -> Vec<u8> {
    join(&[target_id.as_bytes(), redaction_id.as_bytes()])
}

/// The prefix of every pending redaction of `target_id`.
pub fn pending_redactions_of(target_id: &str) -> Vec<u8> {
    join(&[target_id.as_bytes(), b""])
}

/// A client's transaction ID, scoped to its device: `user\0device\0txn`.
pub fn transaction(user_id: &str, device_id: &str, txn_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), txn_id.as_bytes()])
}

/// `room\0user\0receipt type\0thread`: one receipt per user, type and thread in a room.
pub fn receipt(room_id: &str, user_id: &str, receipt_type: &str, thread: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), user_id.as_bytes(), receipt_type.as_bytes(), thread.as_bytes()])
}

/// `room\0ts\0position` (both big-endian): a room's events in `origin_server_ts` order, the
/// stream position breaking ties, for `timestamp_to_event`.
pub fn event_timestamp(room_id: &str, ts: u64, position: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &ts.to_be_bytes(), &position.to_be_bytes()])
}

/// Reports are numbered by a counter; big-endian so the newest sorts last.
pub fn report(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

pub fn counter(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

pub fn meta(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_rows_share_a_prefix_no_other_user_has() {
        let alice = user_rows("@alice:hs");
        assert!(device("@alice:hs", "DEV").starts_with(&alice));
        assert!(!device("@alice:hs2", "DEV").starts_with(&alice));
    }

    #[test]
    fn event_timestamps_sort_by_time_then_position_within_a_room() {
        assert!(event_timestamp("!r:hs", 255, 9) < event_timestamp("!r:hs", 256, 1));
        assert!(event_timestamp("!r:hs", 5, 1) < event_timestamp("!r:hs", 5, 2));
        assert!(event_timestamp("!r:hs", u64::MAX, u64::MAX).starts_with(&room_rows("!r:hs")));
    }

    #[test]
    fn filter_ids_sort_numerically() {
        assert!(filter("@a:hs", 2) < filter("@a:hs", 10));
        assert!(filter("@a:hs", 255) < filter("@a:hs", 256));
    }
}
