//! Key encoding for every table, in one place.
//!
//! Composite keys join their parts with a 0x00 byte. Matrix user IDs and room IDs never contain
//! NUL (their grammar forbids it), nor do event types (checked for every event built or received,
//! `lattice_core::limits::check_event_type`), so a prefix scan over `user\0` or `room\0type\0`
//! finds exactly one user's or one type's rows. The last part of a key may hold any bytes; state
//! keys, which come last, are still kept free of NUL (`check_state_key`) so a
//! `room\0type\0state_key` row can be split back into its parts. Numbers are big-endian
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

/// A change of a user's account data in stream order: `user\0position`; the value is the
/// changed entry's `account_data` key.
pub fn account_data_change(user_id: &str, position: u64) -> Vec<u8> {
    join(&[user_id.as_bytes(), &position.to_be_bytes()])
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

/// A transaction ID of a room send, scoped to the device and the room (like the request path
/// it came with): `user\0device\0room\0txn`.
pub fn room_transaction(user_id: &str, device_id: &str, room_id: &str, txn_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), room_id.as_bytes(), txn_id.as_bytes()])
}

/// `delayed_events`: the `delay_id`.
pub fn delayed_event(delay_id: &str) -> Vec<u8> {
    delay_id.as_bytes().to_vec()
}

/// `delayed_events_due`: the due time (big-endian) then the `delay_id`, so a forward scan
/// meets the next event to fire first.
pub fn delayed_event_due(due_ms: u64, delay_id: &str) -> Vec<u8> {
    let mut key = due_ms.to_be_bytes().to_vec();
    key.extend_from_slice(delay_id.as_bytes());
    key
}

/// The `delay_id` of a `delayed_events_due` key.
pub fn delay_id_of_due_key(key: &[u8]) -> Option<&str> {
    key.get(8..).and_then(|id| std::str::from_utf8(id).ok())
}

/// `delayed_events_by_user`: `user\0delay_id`.
pub fn delayed_event_of_user(user_id: &str, delay_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), delay_id.as_bytes()])
}

/// `delayed_events_finalised`: the `delay_id`.
pub fn delayed_event_finalised(delay_id: &str) -> Vec<u8> {
    delay_id.as_bytes().to_vec()
}

/// `delayed_events_finalised_by_user`: `user\0` then the finalisation time (big-endian) and the
/// `delay_id`: a user's finalised events, oldest first.
pub fn delayed_event_finalised_of_user(user_id: &str, finalised_ms: u64, delay_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), &delayed_event_due(finalised_ms, delay_id)])
}

/// `delayed_events_finalised_by_time`: the finalisation time (big-endian) then the `delay_id`
/// (read back with [`delay_id_of_due_key`]), so the oldest are pruned first.
pub fn delayed_event_finalised_at(finalised_ms: u64, delay_id: &str) -> Vec<u8> {
    delayed_event_due(finalised_ms, delay_id)
}

/// `room\0user\0receipt type\0thread`: one receipt per user, type and thread in a room.
pub fn receipt(room_id: &str, user_id: &str, receipt_type: &str, thread: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), user_id.as_bytes(), receipt_type.as_bytes(), thread.as_bytes()])
}

/// A position stored as a value: eight bytes, big-endian.
pub fn stored_position(raw: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(raw).ok().map(u64::from_be_bytes)
}

/// The position a key ends with (`…\0position`, the last eight bytes, big-endian).
pub fn trailing_position(key: &[u8]) -> Option<u64> {
    key.len().checked_sub(8).and_then(|start| stored_position(&key[start..]))
}

/// Which stream a [`room_activity`] row belongs to.
pub const ACTIVITY_EVENTS: u8 = b'e';
pub const ACTIVITY_RECEIPTS: u8 = b'r';

/// `stream·position·room` (a stream tag byte, the position big-endian in eight bytes): the rooms
/// that changed at each position of the events and receipts streams, so an incremental `/sync`
/// finds the rooms that changed since its token without looking at the user's other rooms.
pub fn room_activity(stream: u8, position: u64, room_id: &str) -> Vec<u8> {
    let mut key = room_activity_from(stream, position);
    key.extend_from_slice(room_id.as_bytes());
    key
}

/// The first key of [`room_activity`] at `position` of `stream`.
pub fn room_activity_from(stream: u8, position: u64) -> Vec<u8> {
    let mut key = vec![stream];
    key.extend_from_slice(&position.to_be_bytes());
    key
}

/// The room of a [`room_activity`] key.
pub fn room_activity_room(key: &[u8]) -> Option<&str> {
    key.get(9..).and_then(|room| std::str::from_utf8(room).ok())
}

/// `room\0position`, big-endian: a room's receipt changes in stream order, so a sync finds
/// the receipts changed since its token without reading the room's other receipts.
pub fn receipt_position(room_id: &str, position: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &position.to_be_bytes()])
}

/// `user\0position`, big-endian: the events that notified a user, newest last (`/notifications`).
pub fn push_notification(user_id: &str, position: u64) -> Vec<u8> {
    join(&[user_id.as_bytes(), &position.to_be_bytes()])
}

/// `position`, big-endian: the event at this stream position notified someone.
pub fn push_event(position: u64) -> Vec<u8> {
    position.to_be_bytes().to_vec()
}

/// `user\0room\0position`, big-endian: the notifying events of one room for one user, so the
/// unread ones (after the read markers) are one short range.
pub fn push_unread(user_id: &str, room_id: &str, position: u64) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.as_bytes(), &position.to_be_bytes()])
}

/// `room\0position`, big-endian: an event that notified every local member of the room alike
/// (all but those with a row of their own), so a room's notifications are one range for all.
pub fn push_room_notification(room_id: &str, position: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &position.to_be_bytes()])
}

/// `user\0room\0`: the prefix of a user's [`push_unread`] and [`push_read_marker`] rows of a room.
pub fn push_room_rows(user_id: &str, room_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.as_bytes(), b""])
}

/// `user\0room\0thread` → position: how far the user's receipts have read (`thread` empty for
/// the unthreaded receipt, `main` or a thread root for threaded ones).
pub fn push_read_marker(user_id: &str, room_id: &str, thread: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.as_bytes(), thread.as_bytes()])
}

/// `user\0app_id\0pushkey`: one pusher of a user.
pub fn pusher(user_id: &str, app_id: &str, pushkey: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), app_id.as_bytes(), pushkey.as_bytes()])
}

/// `app_id\0pushkey\0user`: which users hold a pusher with these IDs.
pub fn pusher_key(app_id: &str, pushkey: &str, user_id: &str) -> Vec<u8> {
    join(&[app_id.as_bytes(), pushkey.as_bytes(), user_id.as_bytes()])
}

/// The prefix of [`pusher_key`] rows of one `app_id` and `pushkey`.
pub fn pusher_key_users(app_id: &str, pushkey: &str) -> Vec<u8> {
    join(&[app_id.as_bytes(), pushkey.as_bytes(), b""])
}

/// `due·position·user\0app_id\0pushkey` (both big-endian): one push waiting for delivery to one
/// pusher, ordered by when it is due (milliseconds since the epoch), then by event; a retry moves
/// it to its new due time, so a gateway that is down never holds back the others.
pub fn push_queue(due_ms: u64, position: u64, user_id: &str, app_id: &str, pushkey: &str) -> Vec<u8> {
    let mut key = push_queue_due(due_ms);
    key.extend_from_slice(&position.to_be_bytes());
    key.extend_from_slice(&pusher(user_id, app_id, pushkey));
    key
}

/// The first [`push_queue`] key due at `due_ms`.
pub fn push_queue_due(due_ms: u64) -> Vec<u8> {
    due_ms.to_be_bytes().to_vec()
}

/// A device's to-device inbox in stream order: `user\0device\0position·seq` (one send may
/// put several messages into one inbox under one position).
pub fn to_device(user_id: &str, device_id: &str, position: u64, seq: u32) -> Vec<u8> {
    let mut order = position.to_be_bytes().to_vec();
    order.extend_from_slice(&seq.to_be_bytes());
    join(&[user_id.as_bytes(), device_id.as_bytes(), &order])
}

/// The prefix of a device's to-device inbox.
pub fn to_device_inbox(user_id: &str, device_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), b""])
}

/// The position part of a [`to_device`] key.
pub fn to_device_position(key: &[u8]) -> Option<u64> {
    let order = key.len().checked_sub(12).map(|start| &key[start..start + 8])?;
    order.try_into().ok().map(u64::from_be_bytes)
}

/// `parent\0rel_type\0depth·order` (both big-endian): the relations of an event by type, in the
/// room's topological order (see [`topological`]). An empty relation type holds every relation of
/// the parent, so one scan answers unfiltered requests.
pub fn relation(parent_id: &str, rel_type: &str, depth: u64, order: u64) -> Vec<u8> {
    join(&[parent_id.as_bytes(), rel_type.as_bytes(), &depth_and_order(depth, order)])
}

/// Schema 1's relations key, `parent\0rel_type\0position`: only the migration to schema 2
/// still names it, to delete those rows.
pub fn relation_schema1(parent_id: &str, rel_type: &str, position: u64) -> Vec<u8> {
    join(&[parent_id.as_bytes(), rel_type.as_bytes(), &position.to_be_bytes()])
}

/// The prefix of [`relation`] keys of one parent and relation type (`""`: all types).
pub fn relations_of(parent_id: &str, rel_type: &str) -> Vec<u8> {
    join(&[parent_id.as_bytes(), rel_type.as_bytes(), b""])
}

/// `room\0depth·order` (both big-endian): a room's history in topological order — the event's
/// `depth`, then its `order` (the stream counter value it was stored with) breaking ties.
pub fn topological(room_id: &str, depth: u64, order: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &depth_and_order(depth, order)])
}

/// The `(depth, order)` that end a [`topological`] or [`relation`] key.
pub fn depth_and_order_of(key: &[u8]) -> Option<(u64, u64)> {
    let tail = key.get(key.len().checked_sub(16)?..)?;
    let (depth, order) = tail.split_at(8);
    Some((u64::from_be_bytes(depth.try_into().ok()?), u64::from_be_bytes(order.try_into().ok()?)))
}

fn depth_and_order(depth: u64, order: u64) -> [u8; 16] {
    let mut both = [0; 16];
    both[..8].copy_from_slice(&depth.to_be_bytes());
    both[8..].copy_from_slice(&order.to_be_bytes());
    both
}

/// `room\0event`: a prev event of the room's history that is not stored (a gap before the events
/// that cite it).
pub fn backward_extremity(room_id: &str, event_id: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), event_id.as_bytes()])
}

/// `room\0root`: a thread's summary.
pub fn thread(room_id: &str, root_id: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), root_id.as_bytes()])
}

/// `room\0position`: threads by their latest activity, for `/threads`.
pub fn thread_activity(room_id: &str, position: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), &position.to_be_bytes()])
}

/// `user\0room`: a room the user has forgotten.
pub fn forgotten_room(user_id: &str, room_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), room_id.as_bytes()])
}

/// A room alias (`#local:server`), the whole alias as given.
pub fn room_alias(alias: &str) -> Vec<u8> {
    alias.as_bytes().to_vec()
}

/// `room\0alias`: the local aliases of a room, found with one prefix scan over `room_rows`.
pub fn room_alias_of(room_id: &str, alias: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), alias.as_bytes()])
}

/// A room published in the public room directory.
pub fn public_room(room_id: &str) -> Vec<u8> {
    room_id.as_bytes().to_vec()
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

/// The unredacted original of a redacted event, by its event ID.
pub fn redacted_original(event_id: &str) -> Vec<u8> {
    event_id.as_bytes().to_vec()
}

/// `redacted_ms\0event_id` (big-endian): kept originals in the order they expire.
pub fn redacted_original_by_time(redacted_ms: u64, event_id: &str) -> Vec<u8> {
    join(&[&redacted_ms.to_be_bytes(), event_id.as_bytes()])
}

/// The event ID part of a [`redacted_original_by_time`] key.
pub fn event_of_redacted_original_by_time(key: &[u8]) -> Option<&[u8]> {
    key.get(9..)
}

/// A device's one-time keys of one algorithm: `user\0device\0algorithm\0`, followed by the
/// key ID.
pub fn one_time_keys_of(user_id: &str, device_id: &str, algorithm: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes(), b""])
}

/// One one-time key: `user\0device\0algorithm\0key ID` (the key ID without its algorithm).
pub fn one_time_key(user_id: &str, device_id: &str, algorithm: &str, key_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes(), key_id.as_bytes()])
}

/// Every key row of one device (`user\0device\0`) in the one-time and fallback key tables.
pub fn device_key_rows(user_id: &str, device_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), b""])
}

/// A device's fallback key of one algorithm: `user\0device\0algorithm`.
pub fn fallback_key(user_id: &str, device_id: &str, algorithm: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes()])
}

/// A user's cross-signing key of one usage (`master`, `self_signing`, `user_signing`).
pub fn cross_signing_key(user_id: &str, usage: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), usage.as_bytes()])
}

/// Signatures by `signer` on one key of `target`: `target\0key\0signer`, where the key is a
/// device ID or a cross-signing key's public key.
pub fn key_signatures(target_user: &str, target_key: &str, signer: &str) -> Vec<u8> {
    join(&[target_user.as_bytes(), target_key.as_bytes(), signer.as_bytes()])
}

/// Every signature row on one key of `target`.
pub fn key_signatures_of(target_user: &str, target_key: &str) -> Vec<u8> {
    join(&[target_user.as_bytes(), target_key.as_bytes(), b""])
}

/// A change of a user's device list, in stream order: `position·user` (big-endian position).
pub fn device_list_change(position: u64, user_id: &str) -> Vec<u8> {
    let mut key = position.to_be_bytes().to_vec();
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// The user of a `device_list_change` key.
pub fn device_list_change_user(key: &[u8]) -> Option<&str> {
    key.get(8..).and_then(|user| std::str::from_utf8(user).ok())
}

/// One version of a user's key backup: `user\0version` (big-endian).
pub fn backup_version(user_id: &str, version: u64) -> Vec<u8> {
    join(&[user_id.as_bytes(), &version.to_be_bytes()])
}

/// The keys of one backup version (`user\0version\0`), or, with a room, of one room in it.
pub fn backup_keys_of(user_id: &str, version: u64, room_id: Option<&str>) -> Vec<u8> {
    match room_id {
        Some(room) => join(&[user_id.as_bytes(), &version.to_be_bytes(), room.as_bytes(), b""]),
        None => join(&[user_id.as_bytes(), &version.to_be_bytes(), b""]),
    }
}

/// One backed-up session key: `user\0version\0room\0session`.
pub fn backup_key(user_id: &str, version: u64, room_id: &str, session_id: &str) -> Vec<u8> {
    join(&[user_id.as_bytes(), &version.to_be_bytes(), room_id.as_bytes(), session_id.as_bytes()])
}

pub fn counter(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// The first byte of counter reservation keys: never the first byte of a UTF-8 counter name.
pub const COUNTER_RESERVATION_PREFIX: u8 = 0xFF;

/// `0xFF name`: how far the named counter may go before another durable reservation.
pub fn counter_reservation(name: &str) -> Vec<u8> {
    [&[COUNTER_RESERVATION_PREFIX], name.as_bytes()].concat()
}

pub fn meta(name: &str) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// `room\0word\0ts·order` (both big-endian) → event ID: the message-search index, one row per
/// distinct word of an event's searchable text, newest last within a room and word. `ts` is the
/// event's `origin_server_ts`, `order` its tiebreak in the room's history (`EventRecord::order`).
pub fn search_word(room_id: &str, word: &str, ts: u64, order: u64) -> Vec<u8> {
    join(&[room_id.as_bytes(), word.as_bytes(), &depth_and_order(ts, order)])
}

/// The prefix of the [`search_word`] rows of one word in one room.
pub fn search_word_rows(room_id: &str, word: &str) -> Vec<u8> {
    join(&[room_id.as_bytes(), word.as_bytes(), b""])
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
    fn kept_originals_sort_by_time_and_name_their_event() {
        let key = redacted_original_by_time(256, "$e:hs");
        assert!(redacted_original_by_time(255, "$z:hs") < key);
        assert_eq!(event_of_redacted_original_by_time(&key), Some(&b"$e:hs"[..]));
    }

    #[test]
    fn topological_keys_sort_by_depth_then_order_within_a_room() {
        assert!(topological("!r:hs", 1, u64::MAX) < topological("!r:hs", 2, 0));
        assert!(topological("!r:hs", 255, 7) < topological("!r:hs", 256, 1));
        assert!(topological("!r:hs", 3, 1) < topological("!r:hs", 3, 2));
        assert!(topological("!r:hs", u64::MAX, u64::MAX).starts_with(&room_rows("!r:hs")));
        assert_eq!(depth_and_order_of(&topological("!r:hs", 9, 300)), Some((9, 300)));
        assert_eq!(depth_and_order_of(&relation("$p", "m.thread", 4, 5)), Some((4, 5)));
        assert_eq!(depth_and_order_of(b"short"), None);
        assert!(relation("$p", "", 1, 1).starts_with(&relations_of("$p", "")));
    }

    #[test]
    fn filter_ids_sort_numerically() {
        assert!(filter("@a:hs", 2) < filter("@a:hs", 10));
        assert!(filter("@a:hs", 255) < filter("@a:hs", 256));
    }
}
