//! Every bound on untrusted input, in one place (architecture invariant 5).

/// Default cap on a client request body; operators can change it in the config.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;

/// User IDs, including `@` and the server name, are at most 255 bytes (spec: identifier grammar).
pub const MAX_USER_ID_BYTES: usize = 255;

/// Longer passwords are refused before hashing so that argon2 cannot be made to chew on megabytes.
pub const MAX_PASSWORD_BYTES: usize = 512;

/// Client-chosen device IDs and display names.
pub const MAX_DEVICE_ID_BYTES: usize = 255;
pub const MAX_DEVICE_DISPLAY_NAME_BYTES: usize = 512;

/// Profile fields.
pub const MAX_DISPLAYNAME_BYTES: usize = 256;
pub const MAX_AVATAR_URL_BYTES: usize = 1024;

/// One account-data event or filter, serialised.
pub const MAX_ACCOUNT_DATA_BYTES: usize = 65_536;
pub const MAX_FILTER_BYTES: usize = 65_536;
pub const MAX_EVENT_TYPE_BYTES: usize = 255;
/// A to-device `message_id` another server sends (it keys the delivery's idempotence).
pub const MAX_MESSAGE_ID_BYTES: usize = 255;

/// Devices one account may hold; logging in beyond this is refused.
pub const MAX_DEVICES_PER_USER: usize = 1_000;

/// Rows returned by one list request (devices, account data).
pub const MAX_LIST_ROWS: usize = 1_000;

/// How long a user-interactive auth session stays usable.
pub const UIA_SESSION_LIFETIME_MS: u64 = 15 * 60 * 1000;

/// Registration tokens: length and alphabet are fixed by the spec (`[A-Za-z0-9._~-]`, ≤ 64).
pub const MAX_REGISTRATION_TOKEN_BYTES: usize = 64;

/// A whole PDU, as serialised (spec: "Size limits"). ruma's format check currently refuses
/// exactly 65536 bytes too (it uses 65535); that one byte is noted in docs/events.md.
pub const MAX_PDU_BYTES: usize = 65_536;

/// Events one auth chain walk may visit before the input is treated as hostile.
pub const MAX_AUTH_CHAIN_EVENTS: usize = 1_000_000;

/// The reason a user gives when reporting an event, a room or a user.
pub const MAX_REPORT_REASON_BYTES: usize = 4_096;

/// A room tag's name (spec: "Room Tagging", at most 255 bytes).
pub const MAX_TAG_BYTES: usize = 255;

/// A state key (spec: "Size limits", at most 255 bytes).
pub const MAX_STATE_KEY_BYTES: usize = 255;

/// An event type fit to be stored: 1 to 255 bytes, no control characters. Types are parts of
/// storage keys joined by NUL, so a NUL inside one would let it pose as another key's prefix.
pub fn check_event_type(kind: &str) -> Result<(), String> {
    if kind.is_empty() || kind.len() > MAX_EVENT_TYPE_BYTES {
        return Err(format!("event type must be 1 to {MAX_EVENT_TYPE_BYTES} bytes"));
    }
    if kind.chars().any(char::is_control) {
        return Err("event type must not contain NUL or other control characters".into());
    }
    Ok(())
}

/// A state key fit to be stored: at most 255 bytes, no NUL.
pub fn check_state_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_STATE_KEY_BYTES {
        return Err(format!("state key must be at most {MAX_STATE_KEY_BYTES} bytes"));
    }
    if key.contains('\0') {
        return Err("state key must not contain NUL".into());
    }
    Ok(())
}

/// End-to-end encryption keys (issue #13).
/// One-time plus fallback keys in one `/keys/upload`.
pub const MAX_KEYS_PER_UPLOAD: usize = 1_000;
/// Unclaimed one-time keys a device may hold; an upload past it is refused.
pub const MAX_ONE_TIME_KEYS_PER_DEVICE: usize = 1_000;
/// Bytes of one uploaded key object (device keys, a one-time key, a cross-signing key).
pub const MAX_KEY_OBJECT_BYTES: usize = 16_384;
/// Bytes of a dehydrated device's `device_data` (MSC3814: the pickled device, encrypted; a
/// few KiB in practice).
pub const MAX_DEHYDRATED_DEVICE_DATA_BYTES: usize = 65_536;
/// Users (or devices, for `/keys/claim`) one `/keys/query` or `/keys/claim` may name.
pub const MAX_KEYS_REQUEST_TARGETS: usize = 1_000;
/// Signatures one `/keys/signatures/upload` may carry.
pub const MAX_SIGNATURES_PER_UPLOAD: usize = 1_000;
/// Session keys one `/room_keys/keys` upload may carry.
pub const MAX_BACKUP_KEYS_PER_UPLOAD: usize = 10_000;
/// Session keys one backup version may hold.
pub const MAX_BACKUP_KEYS_PER_VERSION: usize = 1_000_000;
/// Bytes of one backed-up session key or a backup's `auth_data`.
pub const MAX_BACKUP_OBJECT_BYTES: usize = 16_384;

/// A presence status message (`status_msg`), from a client or another server.
pub const MAX_STATUS_MSG_BYTES: usize = 1_024;
/// Presence updates one `m.presence` EDU carries (`push`); this server sends at most this
/// many per EDU and reads no more from one.
pub const MAX_PRESENCE_PUSHES: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_and_state_keys_that_could_break_keys_are_refused() {
        assert!(check_event_type("m.room.message").is_ok());
        assert!(check_event_type(&"a".repeat(MAX_EVENT_TYPE_BYTES)).is_ok());
        for bad in ["", "m.room\0.member", "m.room.\n", "\u{7f}x"] {
            assert!(check_event_type(bad).is_err(), "{bad:?}");
        }
        assert!(check_event_type(&"a".repeat(MAX_EVENT_TYPE_BYTES + 1)).is_err());
        assert!(check_state_key("").is_ok());
        assert!(check_state_key("@alice:hs.test").is_ok());
        assert!(check_state_key("a\0b").is_err());
        assert!(check_state_key(&"k".repeat(MAX_STATE_KEY_BYTES + 1)).is_err());
    }
}
