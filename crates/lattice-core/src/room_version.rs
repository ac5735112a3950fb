//! Room versions 1–12 and the rules of each, as ruma defines them.

use ruma::RoomVersionId;
use ruma::room_version_rules::RoomVersionRules;

/// The room versions this server can join and create.
pub const SUPPORTED_ROOM_VERSIONS: &[&str] = &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("room version {0:?} is not supported; supported: 1-12")]
pub struct UnsupportedRoomVersion(pub String);

/// A supported room version together with its rules.
#[derive(Clone, Debug)]
pub struct RoomVersion {
    id: RoomVersionId,
    rules: RoomVersionRules,
}

impl RoomVersion {
    /// Refuses versions outside 1–12, including unstable ones ruma knows about.
    pub fn parse(id: &str) -> Result<Self, UnsupportedRoomVersion> {
        let unsupported = || UnsupportedRoomVersion(id.to_owned());
        if !SUPPORTED_ROOM_VERSIONS.contains(&id) {
            return Err(unsupported());
        }
        let id = RoomVersionId::try_from(id).map_err(|_| unsupported())?;
        let rules = id.rules().ok_or_else(unsupported)?;
        Ok(Self { id, rules })
    }

    pub fn id(&self) -> &RoomVersionId {
        &self.id
    }

    pub fn rules(&self) -> &RoomVersionRules {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use ruma::room_version_rules::EventIdFormatVersion;

    use super::*;

    #[test]
    fn versions_one_to_twelve_are_supported_and_nothing_else() {
        for id in SUPPORTED_ROOM_VERSIONS {
            assert_eq!(RoomVersion::parse(id).unwrap().id().as_str(), *id);
        }
        for id in ["0", "13", "org.matrix.msc2176", "", "1.0", " 1"] {
            assert_eq!(RoomVersion::parse(id).unwrap_err(), UnsupportedRoomVersion(id.to_owned()));
        }
    }

    #[test]
    fn event_id_formats_follow_the_version() {
        let format = |v: &str| RoomVersion::parse(v).unwrap().rules().event_id_format;
        assert!(matches!(format("1"), EventIdFormatVersion::V1));
        assert!(matches!(format("2"), EventIdFormatVersion::V1));
        assert!(matches!(format("3"), EventIdFormatVersion::V2));
        assert!(matches!(format("4"), EventIdFormatVersion::V3));
        assert!(matches!(format("12"), EventIdFormatVersion::V3));
    }
}
