//! `/sync` tokens: a position in each stream the sync service reads.

use crate::ServiceError;

/// A position in each stream `/sync` reads. Each stream has its own positions, so a slow
/// write in one (an event's batch) never holds back what another shows (a receipt, a typing
/// notice, a message to a device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSet {
    pub events: u64,
    pub receipts: u64,
    pub typing: u64,
    pub account_data: u64,
    pub to_device: u64,
    /// Changes of users' device lists (keys, devices, cross-signing).
    pub device_lists: u64,
    /// Presence changes (`stream.presence`).
    pub presence: u64,
}

impl StreamSet {
    /// Every stream at `position`: what a token of the single shared stream meant.
    pub(crate) fn all_at(position: u64) -> Self {
        Self {
            events: position,
            receipts: position,
            typing: position,
            account_data: position,
            to_device: position,
            device_lists: position,
            presence: position,
        }
    }

    fn fields(&self) -> [u64; 7] {
        [self.events, self.receipts, self.typing, self.account_data, self.to_device, self.device_lists, self.presence]
    }

    /// Whether any stream is past the same stream in `other`.
    pub(crate) fn any_past(&self, other: &StreamSet) -> bool {
        self.fields().iter().zip(other.fields()).any(|(mine, theirs)| *mine > theirs)
    }
}

/// A `/sync` token: how far each stream was delivered. The to-device part can stay behind the
/// stream when the device's inbox held more than one sync delivers.
///
/// Written `m{events}_{receipts}_{typing}_{account_data}_{to_device}_{device_lists}_{presence}`.
/// Tokens of earlier releases are still read: the six-part form (before the presence stream)
/// and the five-part form (before the device-list stream) — both streams start above the
/// shared stream, so a missing part is 0 — and the single shared stream's `s{position}`
/// and `s{position}_{to_device}` (every stream split off it starts above it). A later
/// multi-writer form will extend each part, not reorder them (docs/client-api.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub streams: StreamSet,
}

impl SyncToken {
    pub fn parse(token: &str) -> Result<Self, ServiceError> {
        let invalid = || ServiceError::InvalidParam(format!("invalid stream token {token:?}"));
        let number = |part: &str| part.parse::<u64>().map_err(|_| invalid());
        if let Some(rest) = token.strip_prefix('m') {
            let parts = rest.split('_').map(number).collect::<Result<Vec<_>, _>>()?;
            let (events, receipts, typing, account_data, to_device, device_lists, presence) = match parts[..] {
                [events, receipts, typing, account_data, to_device, device_lists, presence] => {
                    (events, receipts, typing, account_data, to_device, device_lists, presence)
                }
                [events, receipts, typing, account_data, to_device, device_lists] => {
                    (events, receipts, typing, account_data, to_device, device_lists, 0)
                }
                [events, receipts, typing, account_data, to_device] => {
                    (events, receipts, typing, account_data, to_device, 0, 0)
                }
                _ => return Err(invalid()),
            };
            let streams = StreamSet { events, receipts, typing, account_data, to_device, device_lists, presence };
            return Ok(Self { streams });
        }
        let rest = token.strip_prefix('s').ok_or_else(invalid)?;
        let (position, to_device) = match rest.split_once('_') {
            Some((position, to_device)) => (number(position)?, Some(number(to_device)?)),
            None => (number(rest)?, None),
        };
        if to_device.is_some_and(|delivered| delivered > position) {
            return Err(invalid());
        }
        let mut streams = StreamSet::all_at(position);
        streams.to_device = to_device.unwrap_or(position);
        Ok(Self { streams })
    }

    pub fn render(self) -> String {
        let StreamSet { events, receipts, typing, account_data, to_device, device_lists, presence } = self.streams;
        format!("m{events}_{receipts}_{typing}_{account_data}_{to_device}_{device_lists}_{presence}")
    }
}

/// The events position of any token this server hands out (`/messages` takes `/sync` tokens).
pub fn parse_token(token: &str) -> Result<u64, ServiceError> {
    SyncToken::parse(token).map(|t| t.streams.events)
}

/// A token of the single shared events stream at `position`: what `prev_batch` is when a
/// timeline has no event to continue from.
pub(crate) fn token(position: u64) -> String {
    format!("s{position}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_tokens_round_trip() {
        let streams = StreamSet {
            events: 7,
            receipts: 1_000_003,
            typing: 1_000_001,
            account_data: 2_000_005,
            to_device: 9,
            device_lists: 3_000_001,
            presence: 4_000_002,
        };
        let token = SyncToken { streams };
        assert_eq!(token.render(), "m7_1000003_1000001_2000005_9_3000001_4000002");
        assert_eq!(SyncToken::parse(&token.render()).expect("valid"), token);
        // Six-part tokens come from before the presence stream, which starts above them.
        let six = SyncToken { streams: StreamSet { presence: 0, ..streams } };
        assert_eq!(SyncToken::parse("m7_1000003_1000001_2000005_9_3000001").expect("valid"), six);
        // Five-part tokens come from before the device-list stream, which starts above them.
        let five = SyncToken { streams: StreamSet { device_lists: 0, presence: 0, ..streams } };
        assert_eq!(SyncToken::parse("m7_1000003_1000001_2000005_9").expect("valid"), five);
        // Tokens of the single shared stream mean every stream at that position.
        let shared =
            |position, to_device| SyncToken { streams: StreamSet { to_device, ..StreamSet::all_at(position) } };
        for (text, token) in [("s0", shared(0, 0)), ("s42", shared(42, 42)), ("s42_40", shared(42, 40))] {
            assert_eq!(SyncToken::parse(text).expect("valid"), token, "{text}");
        }
        assert_eq!(parse_token("m7_1_2_3_4").expect("valid"), 7, "/messages reads the events stream");
        for bad in [
            "",
            "s",
            "42",
            "s-1",
            "sx",
            "s4_",
            "s4_5",
            "s4_x",
            "t4",
            "m",
            "m1_2_3_4",
            "m1_2_3_4_5_6_7_8",
            "m1_2_3_4_5_6_",
            "m1__3_4_5",
            "m1_2_3_4_x",
        ] {
            assert!(SyncToken::parse(bad).is_err(), "{bad}");
        }
    }
}
