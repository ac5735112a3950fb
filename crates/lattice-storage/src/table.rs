//! The tables of the database. Each is one RocksDB column family.

macro_rules! tables {
    ($($variant:ident => $name:literal,)*) => {
        /// A table (key space) of the store.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Table { $($variant,)* }

        impl Table {
            pub const ALL: &'static [Table] = &[$(Table::$variant,)*];

            /// The column-family name; never rename one without a migration.
            pub fn name(self) -> &'static str {
                match self { $(Table::$variant => $name,)* }
            }
        }
    };
}

tables! {
    Meta => "meta",
    Counters => "counters",
    Users => "users",
    Profiles => "profiles",
    Devices => "devices",
    AccessTokens => "access_tokens",
    RefreshTokens => "refresh_tokens",
    AccountData => "account_data",
    Filters => "filters",
    RegistrationTokens => "registration_tokens",
    UiaSessions => "uia_sessions",
    Rooms => "rooms",
    Events => "events",
    Timeline => "timeline",
    StateGroups => "state_groups",
    CurrentState => "current_state",
    Memberships => "memberships",
    AuthChains => "auth_chains",
    PendingRedactions => "pending_redactions",
    Transactions => "transactions",
    Receipts => "receipts",
    ReceiptPositions => "receipt_positions",
    AccountDataPositions => "account_data_positions",
    AccountDataChanges => "account_data_changes",
    ToDevice => "to_device",
    ToDeviceTransactions => "to_device_transactions",
    Relations => "relations",
    Threads => "threads",
    ThreadActivity => "thread_activity",
    ForgottenRooms => "forgotten_rooms",
    RoomAliases => "room_aliases",
    RoomAliasIndex => "room_alias_index",
    PublicRooms => "public_rooms",
    EventTimestamps => "event_timestamps",
    Reports => "reports",
    RedactedOriginals => "redacted_originals",
    RedactedOriginalsByTime => "redacted_originals_by_time",
    Topological => "topological",
    BackwardExtremities => "backward_extremities",
    RoomActivity => "room_activity",
    ServerKeys => "server_keys",
    FederationOutbox => "federation_outbox",
    FederationTransactions => "federation_transactions",
    FederationRefetches => "federation_refetches",
    PushNotifications => "push_notifications",
    PushEvents => "push_events",
    PushUnread => "push_unread",
    PushRoomNotifications => "push_room_notifications",
    PushReadMarkers => "push_read_markers",
    Pushers => "pushers",
    PusherKeys => "pusher_keys",
    PushQueue => "push_queue",
    OutOfBandMemberships => "out_of_band_memberships",
    DeviceKeys => "device_keys",
    OneTimeKeys => "one_time_keys",
    FallbackKeys => "fallback_keys",
    CrossSigningKeys => "cross_signing_keys",
    KeySignatures => "key_signatures",
    DeviceListChanges => "device_list_changes",
    DeviceListLatest => "device_list_latest",
    RemoteDeviceLists => "remote_device_lists",
    RemoteDevices => "remote_devices",
    BackupVersions => "backup_versions",
    BackupKeys => "backup_keys",
    SearchWords => "search_words",
    Media => "media",
    MediaRemote => "media_remote",
    MediaThumbnails => "media_thumbnails",
    MediaBlobRefs => "media_blob_refs",
    MediaUsage => "media_usage",
    MediaPreviews => "media_previews",
    MediaPreviewImages => "media_preview_images",
    Presence => "presence",
    DelayedEvents => "delayed_events",
    DelayedEventsDue => "delayed_events_due",
    DelayedEventsByUser => "delayed_events_by_user",
    DelayedEventTransactions => "delayed_event_transactions",
    DelayedEventsFinalised => "delayed_events_finalised",
    DelayedEventsFinalisedByUser => "delayed_events_finalised_by_user",
    DelayedEventsFinalisedByTime => "delayed_events_finalised_by_time",
    DehydratedDevices => "dehydrated_devices",
}
