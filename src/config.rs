//! The configuration: one typed struct with defaults that work, read from an optional TOML file
//! and `LATTICE_*` environment variables. Unknown keys and invalid values are refused with the
//! key's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ruma::OwnedServerName;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server_name: OwnedServerName,
    pub data_dir: PathBuf,
    pub listen: ListenConfig,
    pub registration: RegistrationConfig,
    pub discovery: DiscoveryConfig,
    pub limits: LimitsConfig,
    pub rate_limits: RateLimitsConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub logging: LoggingConfig,
    pub rooms: RoomsConfig,
    pub push: PushConfig,
    pub user_directory: UserDirectoryConfig,
    pub calls: CallsConfig,
    pub federation: FederationConfig,
    pub media: MediaSection,
    pub presence: PresenceSection,
    pub delayed_events: DelayedEventsSection,
    /// `LATTICE_*` environment variables that name no configuration key, such as a wrapper
    /// script's own `LATTICE_BIN`: ignored, and logged at start.
    #[serde(skip)]
    pub ignored_environment: Vec<String>,
}

/// `[federation]`: the TLS listener for other servers, how their certificates are checked,
/// where their keys come from, and name pins for test networks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// The TLS listener for the server-server API (e.g. `0.0.0.0:8448`). Unset: federation is
    /// off, and the server-server routes answer `404 M_UNRECOGNIZED` everywhere.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) of the federation listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Check other servers' certificates. `false` only on test networks.
    pub verify_peer_tls: bool,
    /// Extra PEM certificates trusted as roots for other servers (e.g. a test network's CA or
    /// self-signed certificates).
    pub trusted_ca: Option<PathBuf>,
    /// Notary servers asked for a server's keys when it cannot be reached itself. Empty by
    /// default: keys come only from their own server.
    pub trusted_key_servers: Vec<String>,
    /// Server name -> `ip:port`, skipping DNS and `.well-known` for these names (test
    /// networks, split-horizon setups). The certificate must still be valid for the name.
    pub resolve: BTreeMap<String, SocketAddr>,
    /// `false`: no DNS lookups (and so no `.well-known`): only IP-literal server names and
    /// `resolve` pins are reachable. For closed test networks.
    pub dns: bool,
    /// How long other servers may cache this server's keys (`valid_until_ts`), e.g. `"1d"`.
    pub key_valid_for: String,
    /// Servers this one never federates with: patterns with `*` and `?` as in
    /// `m.room.server_acl` (`"evil.example"`, `"*.spam.example"`), matched against the host.
    /// Their requests get `403 M_FORBIDDEN`; nothing is sent to them.
    pub deny_servers: Vec<String>,
    /// Requests of one origin server handled at once; more wait in its queue.
    pub concurrent_requests_per_origin: usize,
    /// Requests of one origin server that may wait; more get `429 M_LIMIT_EXCEEDED`.
    pub queued_requests_per_origin: usize,
    /// CIDR blocks other servers' names may not lead to, on top of the built-in list of
    /// private and special ranges (loopback, RFC 1918, link-local, …). Applies to addresses
    /// from DNS, `.well-known` and IP-literal server names, and to media `Location`s; not to
    /// `resolve` pins.
    pub ip_range_deny: Vec<String>,
    /// CIDR blocks allowed even when denied (a peer in the same private network, a test
    /// network on loopback).
    pub ip_range_allow: Vec<String>,
    /// How long another server may be unreachable before its queue keeps only the newest event
    /// of each room (it fetches or backfills the rest when back), e.g. `"10m"`.
    pub catch_up_after: String,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            listen: None,
            tls_cert: None,
            tls_key: None,
            verify_peer_tls: true,
            trusted_ca: None,
            trusted_key_servers: Vec::new(),
            resolve: BTreeMap::new(),
            dns: true,
            key_valid_for: "1d".to_owned(),
            deny_servers: Vec::new(),
            concurrent_requests_per_origin: 10,
            queued_requests_per_origin: 100,
            ip_range_deny: Vec::new(),
            ip_range_allow: Vec::new(),
            catch_up_after: "10m".to_owned(),
        }
    }
}

impl FederationConfig {
    /// `key_valid_for` in milliseconds (checked when the configuration is loaded).
    pub fn key_valid_for_ms(&self) -> anyhow::Result<u64> {
        let ms = parse_duration_ms(&self.key_valid_for).with_context(|| {
            format!("invalid configuration at key `federation.key_valid_for`: {:?}", self.key_valid_for)
        })?;
        if !(1000..=lattice_federation::key_cache::MAX_VALIDITY_AHEAD_MS).contains(&ms) {
            bail!("invalid configuration at key `federation.key_valid_for`: must be from 1s to 7d");
        }
        Ok(ms)
    }

    /// `catch_up_after`, parsed.
    pub fn catch_up_after(&self) -> anyhow::Result<Duration> {
        let ms = parse_duration_ms(&self.catch_up_after).with_context(|| {
            format!("invalid configuration at key `federation.catch_up_after`: {:?}", self.catch_up_after)
        })?;
        Ok(Duration::from_millis(ms))
    }

    /// `trusted_key_servers`, parsed.
    pub fn notaries(&self) -> anyhow::Result<Vec<OwnedServerName>> {
        self.trusted_key_servers
            .iter()
            .map(|name| {
                OwnedServerName::try_from(name.as_str()).map_err(|_| {
                    anyhow::anyhow!(
                        "invalid configuration at key `federation.trusted_key_servers`: {name:?} is not a server name"
                    )
                })
            })
            .collect()
    }

    /// The outbound address policy of `ip_range_deny` and `ip_range_allow`.
    pub fn address_policy(&self) -> anyhow::Result<lattice_federation::AddressPolicy> {
        address_policy("federation", &self.ip_range_deny, &self.ip_range_allow)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.key_valid_for_ms()?;
        self.catch_up_after()?;
        self.address_policy()?;
        self.notaries()?;
        if self.concurrent_requests_per_origin == 0 {
            bail!("invalid configuration at key `federation.concurrent_requests_per_origin`: must be at least 1");
        }
        for name in self.resolve.keys() {
            if <&ruma::ServerName>::try_from(name.as_str()).is_err() {
                bail!("invalid configuration at key `federation.resolve`: {name:?} is not a server name");
            }
        }
        if self.listen.is_some() {
            if self.tls_cert.is_none() {
                bail!("invalid configuration at key `federation.tls_cert`: required when federation.listen is set");
            }
            if self.tls_key.is_none() {
                bail!("invalid configuration at key `federation.tls_key`: required when federation.listen is set");
            }
        }
        Ok(())
    }
}

/// An address policy from a section's `ip_range_deny` and `ip_range_allow`.
fn address_policy(
    section: &str,
    deny: &[String],
    allow: &[String],
) -> anyhow::Result<lattice_federation::AddressPolicy> {
    let parse = |key: &str, blocks: &[String]| {
        lattice_federation::address_policy::parse_blocks(blocks)
            .map_err(|e| anyhow::anyhow!("invalid configuration at key `{section}.{key}`: {e}"))
    };
    Ok(lattice_federation::AddressPolicy::new(parse("ip_range_deny", deny)?, parse("ip_range_allow", allow)?))
}

/// `[media.url_preview]`: previews of links (`/preview_url`), off by default.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UrlPreviewSection {
    /// Fetch pages for link previews. Off: `/preview_url` answers `404 M_UNRECOGNIZED`.
    pub enabled: bool,
    /// The largest page or image read, in bytes.
    pub max_page_size: usize,
    /// The longest a whole preview may take (page, redirects and image), e.g. `"10s"`.
    pub timeout: String,
    /// How long a preview is served from the cache, e.g. `"24h"`.
    pub cache_ttl: String,
    /// How long the images previews stored are kept, e.g. `"7d"`; at least `cache_ttl`.
    pub image_retention: String,
    /// CIDR blocks pages may not be fetched from, on top of the built-in list.
    pub ip_range_deny: Vec<String>,
    /// CIDR blocks pages may be fetched from even when denied (an intranet, tests).
    pub ip_range_allow: Vec<String>,
}

impl Default for UrlPreviewSection {
    fn default() -> Self {
        Self {
            enabled: false,
            max_page_size: 10 << 20,
            timeout: "10s".to_owned(),
            cache_ttl: "24h".to_owned(),
            image_retention: "7d".to_owned(),
            ip_range_deny: Vec::new(),
            ip_range_allow: Vec::new(),
        }
    }
}

impl UrlPreviewSection {
    /// How long preview images are kept, checked against the cache's TTL.
    fn image_retention_ms(&self) -> anyhow::Result<u64> {
        let parse = |key: &str, text: &str| {
            parse_duration_ms(text)
                .with_context(|| format!("invalid configuration at key `media.url_preview.{key}`: {text:?}"))
        };
        let retention = parse("image_retention", &self.image_retention)?;
        if retention < parse("cache_ttl", &self.cache_ttl)? {
            bail!(
                "invalid configuration at key `media.url_preview.image_retention`: {:?} is shorter than `cache_ttl` ({:?}); a cached preview would name a deleted image",
                self.image_retention,
                self.cache_ttl
            );
        }
        Ok(retention)
    }

    /// The service's preview configuration; `None` when previews are off.
    pub fn service_config(&self) -> anyhow::Result<Option<lattice_service::UrlPreviewConfig>> {
        let policy = address_policy("media.url_preview", &self.ip_range_deny, &self.ip_range_allow)?;
        let duration = |key: &str, text: &str| {
            parse_duration_ms(text)
                .with_context(|| format!("invalid configuration at key `media.url_preview.{key}`: {text:?}"))
        };
        let timeout_ms = duration("timeout", &self.timeout)?;
        if !(1000..=120_000).contains(&timeout_ms) {
            bail!("invalid configuration at key `media.url_preview.timeout`: must be from 1s to 2m");
        }
        let cache_ttl_ms = duration("cache_ttl", &self.cache_ttl)?;
        if self.max_page_size < 1024 {
            bail!("invalid configuration at key `media.url_preview.max_page_size`: must be at least 1024");
        }
        Ok(self.enabled.then(|| lattice_service::UrlPreviewConfig {
            max_page_bytes: self.max_page_size,
            timeout: std::time::Duration::from_millis(timeout_ms),
            cache_ttl_ms,
            policy: std::sync::Arc::new(policy),
        }))
    }
}

/// `[media]`: uploads, downloads, thumbnails, other servers' media (docs/media.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSection {
    /// The largest upload, in bytes (also the largest remote file fetched).
    pub max_upload_size: u64,
    /// Total bytes each user may upload; unset: no quota.
    pub max_user_bytes: Option<u64>,
    /// Media created before this time (RFC 3339, e.g. `"2026-12-01T00:00:00Z"`) is also served
    /// by the legacy unauthenticated `/_matrix/media/v3/download` and `/thumbnail`. Unset: the
    /// time this server first started with media support, so nothing new is served there.
    pub unauthenticated_media_before: Option<String>,
    /// How long a media ID from `POST /_matrix/media/v1/create` waits for its upload.
    pub unused_upload_expiry: String,
    pub url_preview: UrlPreviewSection,
    pub s3: S3Section,
}

/// `[media.s3]`: blobs in an S3-compatible bucket instead of `<data_dir>/media` (several
/// server machines share one store). Off while `bucket` is unset.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Section {
    pub bucket: Option<String>,
    pub region: String,
    /// For stores other than AWS (MinIO, Ceph, Garage, …): `https://host[:port]`.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    /// Better given as `LATTICE_MEDIA__S3__SECRET_ACCESS_KEY` than in the file.
    pub secret_access_key: Option<String>,
    /// Prepended to every object name, e.g. `"lattice/"`.
    pub prefix: String,
    /// Allows an `http://` endpoint (a store on the same machine or a private network).
    pub allow_http: bool,
}

impl Default for S3Section {
    fn default() -> Self {
        Self {
            bucket: None,
            region: "us-east-1".to_owned(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            allow_http: false,
        }
    }
}

impl S3Section {
    fn service_config(&self) -> anyhow::Result<Option<lattice_service::S3Config>> {
        let Some(bucket) = &self.bucket else { return Ok(None) };
        let required = |value: &Option<String>, key: &str| {
            value.clone().filter(|v| !v.is_empty()).with_context(|| {
                format!("invalid configuration: `media.s3.bucket` is set, so `media.s3.{key}` is required too")
            })
        };
        if bucket.is_empty() {
            bail!("invalid configuration at key `media.s3.bucket`: empty");
        }
        if let Some(endpoint) = &self.endpoint {
            let plain = endpoint.starts_with("http://");
            if !plain && !endpoint.starts_with("https://") {
                bail!("invalid configuration at key `media.s3.endpoint`: {endpoint:?} is not an http(s) URL");
            }
            if plain && !self.allow_http {
                bail!(
                    "invalid configuration at key `media.s3.endpoint`: {endpoint:?} is plain http; set `media.s3.allow_http = true` if that is meant"
                );
            }
        }
        Ok(Some(lattice_service::S3Config {
            bucket: bucket.clone(),
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            access_key_id: required(&self.access_key_id, "access_key_id")?,
            secret_access_key: required(&self.secret_access_key, "secret_access_key")?,
            prefix: self.prefix.clone(),
            allow_http: self.allow_http,
        }))
    }
}

impl Default for MediaSection {
    fn default() -> Self {
        Self {
            max_upload_size: 50 << 20,
            max_user_bytes: None,
            unauthenticated_media_before: None,
            unused_upload_expiry: "24h".to_owned(),
            url_preview: UrlPreviewSection::default(),
            s3: S3Section::default(),
        }
    }
}

impl MediaSection {
    /// The service's media configuration, with blobs under `<data_dir>/media`.
    pub fn service_config(&self, data_dir: &Path) -> anyhow::Result<lattice_service::MediaConfig> {
        let legacy_cutoff_ms = match &self.unauthenticated_media_before {
            None => None,
            Some(text) => {
                let time = humantime::parse_rfc3339_weak(text.trim()).map_err(|e| {
                    anyhow::anyhow!("invalid configuration at key `media.unauthenticated_media_before`: {text:?}: {e}")
                })?;
                let ms = time.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                Some(u64::try_from(ms).unwrap_or(u64::MAX))
            }
        };
        let unused_expiry_ms = parse_duration_ms(&self.unused_upload_expiry).with_context(|| {
            format!("invalid configuration at key `media.unused_upload_expiry`: {:?}", self.unused_upload_expiry)
        })?;
        if self.max_upload_size == 0 {
            bail!("invalid configuration at key `media.max_upload_size`: must be positive");
        }
        if unused_expiry_ms < 1000 {
            bail!("invalid configuration at key `media.unused_upload_expiry`: must be at least 1s");
        }
        Ok(lattice_service::MediaConfig {
            directory: data_dir.join("media"),
            max_upload_bytes: self.max_upload_size,
            max_user_bytes: self.max_user_bytes,
            legacy_cutoff_ms,
            unused_expiry_ms,
            url_preview: self.url_preview.service_config()?,
            preview_image_retention_ms: self.url_preview.image_retention_ms()?,
            s3: self.s3.service_config()?,
            ..lattice_service::MediaConfig::default()
        })
    }
}

/// `[push]`: delivery to push gateways.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Pushers may name `http://` push gateways; off, only `https://` URLs are accepted.
    pub allow_insecure_gateways: bool,
    /// `counts.unread` in pushes is the number of unread notifying events; off (the default),
    /// the number of rooms with any, as Element's apps show on their badge.
    pub badge_counts_messages: bool,
}

/// `[calls]`: the TURN server `GET /voip/turnServer` hands out credentials for, and the
/// MatrixRTC focus announced in `/.well-known/matrix/client`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// `turn:`/`turns:` URIs of the TURN server; empty: no TURN server.
    pub turn_uris: Vec<String>,
    /// coturn's `static-auth-secret`: credentials are then time-limited (TURN REST API).
    pub turn_shared_secret: Option<String>,
    /// Static credentials, instead of a shared secret.
    pub turn_username: Option<String>,
    pub turn_password: Option<String>,
    /// Lifetime of shared-secret credentials (and the `ttl` clients are told): `"1d"`, `"12h"`, …
    pub turn_ttl: String,
    /// A LiveKit SFU's JWT service for Element Call (MSC4143 `rtc_foci`).
    pub livekit_service_url: Option<String>,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            turn_uris: Vec::new(),
            turn_shared_secret: None,
            turn_username: None,
            turn_password: None,
            turn_ttl: "1d".to_owned(),
            livekit_service_url: None,
        }
    }
}

impl CallsConfig {
    /// The TURN configuration the service takes; `None` without URIs. Checked at load.
    pub fn turn(&self) -> anyhow::Result<Option<lattice_service::TurnConfig>> {
        use lattice_service::{TurnConfig, TurnCredentials};
        let credentials = match (&self.turn_shared_secret, &self.turn_username, &self.turn_password) {
            (None, None, None) if self.turn_uris.is_empty() => return Ok(None),
            (Some(secret), None, None) if !secret.is_empty() => TurnCredentials::SharedSecret(secret.clone()),
            (None, Some(username), Some(password)) => {
                TurnCredentials::Static { username: username.clone(), password: password.clone() }
            }
            _ => bail!(
                "invalid configuration at key `calls`: set either `turn_shared_secret` (non-empty) or both `turn_username` and `turn_password`, with `turn_uris`"
            ),
        };
        if self.turn_uris.is_empty() {
            bail!("invalid configuration at key `calls.turn_uris`: TURN credentials are set but no URI");
        }
        if let Some(uri) = self.turn_uris.iter().find(|uri| !(uri.starts_with("turn:") || uri.starts_with("turns:"))) {
            bail!("invalid configuration at key `calls.turn_uris`: {uri:?} is not a turn: or turns: URI");
        }
        let ttl_ms = parse_duration_ms(&self.turn_ttl)
            .with_context(|| format!("invalid configuration at key `calls.turn_ttl`: {:?}", self.turn_ttl))?;
        let ttl_secs = ttl_ms / 1000;
        if !(60..=7 * 24 * 3600).contains(&ttl_secs) {
            bail!("invalid configuration at key `calls.turn_ttl`: must be 1 minute to 7 days");
        }
        Ok(Some(TurnConfig { uris: self.turn_uris.clone(), credentials, ttl_secs }))
    }
}

/// `[presence]`: whether users' presence is tracked and shared, and when time moves it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSection {
    /// Off: presence is not tracked; `/sync` carries none, `GET /presence` answers `offline`,
    /// `PUT /presence` is refused with `403`, and presence EDUs are neither sent nor accepted.
    pub enabled: bool,
    /// An online user inactive this long shows as `unavailable`: `"5m"`, `"90s"`, …
    pub idle_timeout: String,
    /// A user with no `/sync` running and none for this long goes `offline`.
    pub offline_timeout: String,
}

impl Default for PresenceSection {
    fn default() -> Self {
        Self { enabled: true, idle_timeout: "5m".to_owned(), offline_timeout: "30s".to_owned() }
    }
}

impl PresenceSection {
    /// The presence configuration the service takes. Checked at load.
    pub fn service_config(&self) -> anyhow::Result<lattice_service::PresenceConfig> {
        let read = |key: &str, text: &str, range: std::ops::RangeInclusive<u64>| -> anyhow::Result<u64> {
            let ms = parse_duration_ms(text)
                .with_context(|| format!("invalid configuration at key `presence.{key}`: {text:?}"))?;
            if !range.contains(&ms) {
                bail!(
                    "invalid configuration at key `presence.{key}`: must be {}s to {}s",
                    range.start() / 1000,
                    range.end() / 1000
                );
            }
            Ok(ms)
        };
        let mut config = lattice_service::PresenceConfig { enabled: self.enabled, ..Default::default() };
        config.timeouts.idle_ms = read("idle_timeout", &self.idle_timeout, 1_000..=24 * 3600 * 1000)?;
        config.timeouts.offline_ms = read("offline_timeout", &self.offline_timeout, 1_000..=3600 * 1000)?;
        Ok(config)
    }
}

/// `[delayed_events]`: events users schedule to be sent later (MSC4140), as Element Call
/// does to leave a call when its client vanishes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayedEventsSection {
    /// Off: scheduling is refused (`400`), the management endpoints answer `404`, and
    /// `/versions` does not advertise `org.matrix.msc4140`.
    pub enabled: bool,
    /// The longest delay a client may ask for: `"24h"`, `"30m"`, …
    pub max_delay: String,
    /// Events one user may have scheduled at once (1 to 1000).
    pub max_scheduled_per_user: usize,
    /// How long sent and cancelled events stay readable to their owner: `"7d"`; `"0"` keeps none.
    pub finalised_retention: String,
}

impl Default for DelayedEventsSection {
    fn default() -> Self {
        let defaults = lattice_service::DelayedEventsConfig::default();
        Self {
            enabled: defaults.enabled,
            max_delay: "24h".to_owned(),
            max_scheduled_per_user: defaults.max_scheduled_per_user,
            finalised_retention: "7d".to_owned(),
        }
    }
}

impl DelayedEventsSection {
    /// The delayed-events configuration the service takes. Checked at load.
    pub fn service_config(&self) -> anyhow::Result<lattice_service::DelayedEventsConfig> {
        let max_delay_ms = parse_duration_ms(&self.max_delay).with_context(|| {
            format!("invalid configuration at key `delayed_events.max_delay`: {:?}", self.max_delay)
        })?;
        if !(1_000..=30 * 24 * 3600 * 1000).contains(&max_delay_ms) {
            bail!("invalid configuration at key `delayed_events.max_delay`: must be 1s to 30d");
        }
        if !(1..=lattice_core::limits::MAX_LIST_ROWS).contains(&self.max_scheduled_per_user) {
            bail!(
                "invalid configuration at key `delayed_events.max_scheduled_per_user`: must be 1 to {}",
                lattice_core::limits::MAX_LIST_ROWS
            );
        }
        let finalised_retention_ms = parse_duration_ms(&self.finalised_retention).with_context(|| {
            format!("invalid configuration at key `delayed_events.finalised_retention`: {:?}", self.finalised_retention)
        })?;
        if finalised_retention_ms > 365 * 24 * 3600 * 1000 {
            bail!("invalid configuration at key `delayed_events.finalised_retention`: must be 0 to 365d");
        }
        Ok(lattice_service::DelayedEventsConfig {
            enabled: self.enabled,
            max_delay_ms,
            max_scheduled_per_user: self.max_scheduled_per_user,
            finalised_retention_ms,
        })
    }
}

/// `[user_directory]`: whom `POST /user_directory/search` finds.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    /// Every active local user, not only those sharing a room with the searcher or joined to a
    /// public room.
    pub search_all_users: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    pub default_room_version: String,
    /// Seconds the sorted public room directory is served from memory (0: read it every time).
    pub public_rooms_cache_secs: u64,
    /// How long server admins can still read what a redaction removed: a number with a unit
    /// (`s`, `m`, `h`, `d`, …), e.g. `"7d"`; `"0"` keeps nothing.
    pub redaction_retention: String,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_room_version: lattice_service::rooms::DEFAULT_ROOM_VERSION.to_owned(),
            public_rooms_cache_secs: 10,
            redaction_retention: "7d".to_owned(),
        }
    }
}

impl RoomsConfig {
    /// `redaction_retention` in milliseconds (checked when the configuration is loaded).
    pub fn redaction_retention_ms(&self) -> anyhow::Result<u64> {
        parse_duration_ms(&self.redaction_retention).with_context(|| {
            format!("invalid configuration at key `rooms.redaction_retention`: {:?}", self.redaction_retention)
        })
    }
}

/// A duration as humantime reads it (`"90s"`, `"30m"`, `"12h"`, `"7d"`, `"0"`), in milliseconds.
fn parse_duration_ms(text: &str) -> anyhow::Result<u64> {
    let duration = humantime::parse_duration(text.trim())?;
    u64::try_from(duration.as_millis()).context("duration too long")
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub address: SocketAddr,
    pub trust_x_forwarded_for: bool,
    /// Peers (CIDR blocks) whose `X-Forwarded-For` hops are believed.
    pub trusted_proxies: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationModeConfig {
    Token,
    Open,
    Disabled,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    pub mode: RegistrationModeConfig,
    /// Days the registration token created at first start stays valid.
    pub first_token_valid_days: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    pub client_base_url: Option<String>,
    pub server_delegation: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_request_bytes: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub enabled: bool,
    pub login_per_ip: RateConfig,
    pub login_per_user: RateConfig,
    pub registration_per_ip: RateConfig,
    pub uia_password_per_ip: RateConfig,
    pub uia_password_per_user: RateConfig,
    pub public_rooms_per_ip: RateConfig,
    pub message_per_user: RateConfig,
    pub room_creation_per_user: RateConfig,
    pub invite_per_user: RateConfig,
    pub join_per_user: RateConfig,
    pub to_device_per_user: RateConfig,
    /// Authenticated server-server requests per origin server.
    pub federation_per_origin: RateConfig,
    /// Server-server requests failing authentication per client address; past it the address
    /// is refused (`429`) until the limit lets it in again.
    pub federation_failed_auth_per_ip: RateConfig,
    /// Notary key queries (`/_matrix/key/v2/query`) per client address.
    pub key_query_per_ip: RateConfig,
    pub url_preview_per_user: RateConfig,
    /// Delayed-event management (MSC4140): restarts, sends and cancels per `delay_id` (a
    /// heartbeat restarts every few seconds), and listings per user.
    pub delayed_events_per_key: RateConfig,
}

impl RateLimitsConfig {
    /// Every limit with its key under `[rate_limits]`.
    pub fn all(&self) -> [(&'static str, RateConfig); 16] {
        [
            ("login_per_ip", self.login_per_ip),
            ("login_per_user", self.login_per_user),
            ("registration_per_ip", self.registration_per_ip),
            ("uia_password_per_ip", self.uia_password_per_ip),
            ("uia_password_per_user", self.uia_password_per_user),
            ("public_rooms_per_ip", self.public_rooms_per_ip),
            ("message_per_user", self.message_per_user),
            ("room_creation_per_user", self.room_creation_per_user),
            ("invite_per_user", self.invite_per_user),
            ("join_per_user", self.join_per_user),
            ("to_device_per_user", self.to_device_per_user),
            ("federation_per_origin", self.federation_per_origin),
            ("federation_failed_auth_per_ip", self.federation_failed_auth_per_ip),
            ("key_query_per_ip", self.key_query_per_ip),
            ("url_preview_per_user", self.url_preview_per_user),
            ("delayed_events_per_key", self.delayed_events_per_key),
        ]
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub refreshable_token_lifetime_secs: u64,
    pub password_hash_memory_kib: u32,
    pub password_hash_iterations: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub sync_writes: bool,
    pub block_cache_mib: usize,
    /// Testing only: keep unsynced WAL writes in process memory, so `kill -9` loses them as a
    /// power cut would (the power-loss test runs the binary with it).
    pub testing_wal_in_process_memory: bool,
    /// Rows one chunk of a schema migration reads (each chunk is one atomic write).
    pub migration_chunk_rows: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".try_into().expect("valid server name"),
            data_dir: PathBuf::from("./lattice-data"),
            listen: ListenConfig::default(),
            registration: RegistrationConfig::default(),
            discovery: DiscoveryConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            logging: LoggingConfig::default(),
            rooms: RoomsConfig::default(),
            push: PushConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            calls: CallsConfig::default(),
            federation: FederationConfig::default(),
            media: MediaSection::default(),
            presence: PresenceSection::default(),
            delayed_events: DelayedEventsSection::default(),
            ignored_environment: Vec::new(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 8008)),
            trust_x_forwarded_for: false,
            // A reverse proxy on the same host, the usual deployment.
            trusted_proxies: vec!["127.0.0.1/32".into(), "::1/128".into()],
        }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self { mode: RegistrationModeConfig::Token, first_token_valid_days: 7 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_request_bytes: lattice_core::limits::DEFAULT_MAX_REQUEST_BYTES }
    }
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            login_per_ip: RateConfig { per_second: 0.2, burst: 10 },
            login_per_user: RateConfig { per_second: 0.1, burst: 5 },
            registration_per_ip: RateConfig { per_second: 0.1, burst: 5 },
            // Password guesses through user-interactive auth: fewer than login allows, since a
            // client asks for the password there only before a rare, sensitive change.
            uia_password_per_ip: RateConfig { per_second: 0.1, burst: 10 },
            uia_password_per_user: RateConfig { per_second: 0.05, burst: 5 },
            public_rooms_per_ip: RateConfig { per_second: 1.0, burst: 20 },
            message_per_user: RateConfig { per_second: 5.0, burst: 30 },
            room_creation_per_user: RateConfig { per_second: 0.05, burst: 5 },
            invite_per_user: RateConfig { per_second: 0.5, burst: 20 },
            join_per_user: RateConfig { per_second: 0.5, burst: 20 },
            to_device_per_user: RateConfig { per_second: 10.0, burst: 100 },
            // A peer catching up fetches events, state and history in bursts.
            federation_per_origin: RateConfig { per_second: 50.0, burst: 300 },
            federation_failed_auth_per_ip: RateConfig { per_second: 0.5, burst: 30 },
            key_query_per_ip: RateConfig { per_second: 5.0, burst: 100 },
            // Each preview may fetch a page and an image from another host.
            url_preview_per_user: RateConfig { per_second: 0.5, burst: 20 },
            // Element Call restarts its delayed leave event every few seconds.
            delayed_events_per_key: RateConfig { per_second: 2.0, burst: 20 },
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        // OWASP's argon2id floor: 19 MiB, 2 passes.
        Self { refreshable_token_lifetime_secs: 3600, password_hash_memory_kib: 19 * 1024, password_hash_iterations: 2 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        // Durable by default: group commit makes the fsync cheap (docs/benchmarks.md, issue #10).
        Self {
            sync_writes: true,
            block_cache_mib: 8,
            testing_wal_in_process_memory: false,
            migration_chunk_rows: lattice_storage::DEFAULT_MIGRATION_CHUNK_ROWS,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: "info".into() }
    }
}

/// Environment variables that configure the CLI itself rather than the server.
const CLI_VARIABLES: &[&str] = &["LATTICE_CONFIG"];

impl Config {
    /// Reads `path` (if any), applies `LATTICE_*` overrides from `env`, and checks the result.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let mut table = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("config file {} is not valid TOML", path.display()))?
            }
            None => toml::Table::new(),
        };
        let known_keys = serde_json::to_value(Config::default()).context("listing the configuration keys")?;
        let mut ignored_environment = Vec::new();
        for (name, value) in env {
            if !apply_env_override(&mut table, &known_keys, &name, &value)? {
                ignored_environment.push(name);
            }
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            anyhow::anyhow!("invalid configuration at key `{key}`: {}", e.into_inner())
        })?;
        config.validate()?;
        config.ignored_environment = ignored_environment;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.limits.max_request_bytes < 1024 {
            bail!("invalid configuration at key `limits.max_request_bytes`: must be at least 1024");
        }
        for (key, rate) in self.rate_limits.all() {
            if !(rate.per_second > 0.0 && rate.per_second.is_finite()) || rate.burst == 0 {
                bail!("invalid configuration at key `rate_limits.{key}`: per_second and burst must be positive");
            }
        }
        if self.auth.password_hash_memory_kib < 8 || self.auth.password_hash_iterations == 0 {
            bail!("invalid configuration at key `auth`: argon2 needs at least 8 KiB and 1 iteration");
        }
        if self.auth.refreshable_token_lifetime_secs < 60 {
            bail!("invalid configuration at key `auth.refreshable_token_lifetime_secs`: must be at least 60");
        }
        self.trusted_proxies()?;
        if !(1..=lattice_storage::MAX_SCAN_ROWS).contains(&self.storage.migration_chunk_rows) {
            bail!(
                "invalid configuration at key `storage.migration_chunk_rows`: must be 1 to {}",
                lattice_storage::MAX_SCAN_ROWS
            );
        }
        self.calls.turn()?;
        if let Some(url) = &self.calls.livekit_service_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            bail!("invalid configuration at key `calls.livekit_service_url`: must be an http(s) URL");
        }
        if let Some(url) = &self.discovery.client_base_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            bail!("invalid configuration at key `discovery.client_base_url`: must be an http(s) URL");
        }
        if lattice_core::room_version::RoomVersion::parse(&self.rooms.default_room_version).is_err() {
            bail!(
                "invalid configuration at key `rooms.default_room_version`: {:?} is not a supported room version (1–12)",
                self.rooms.default_room_version
            );
        }
        self.rooms.redaction_retention_ms()?;
        self.federation.validate()?;
        self.media.service_config(&self.data_dir)?;
        self.presence.service_config()?;
        self.delayed_events.service_config()?;
        if self.logging.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            bail!(
                "invalid configuration at key `logging.level`: not a tracing filter (e.g. \"info\" or \"lattice=debug,info\")"
            );
        }
        Ok(())
    }

    /// `listen.trusted_proxies`, parsed.
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<lattice_api::IpNetwork>> {
        self.listen
            .trusted_proxies
            .iter()
            .map(|block| {
                block.parse().map_err(|e| anyhow::anyhow!("invalid configuration at key `listen.trusted_proxies`: {e}"))
            })
            .collect()
    }

    pub fn database_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.data_dir.join("signing.key")
    }

    /// The keys this server signed with before rotations (`lattice key rotate`).
    pub fn old_signing_keys_path(&self) -> PathBuf {
        self.data_dir.join("old_signing_keys")
    }
}

/// `LATTICE_LISTEN__ADDRESS=0.0.0.0:8008` sets `listen.address`: `__` separates levels.
/// Values are read as TOML when they parse as one (numbers, booleans, inline tables), else as
/// strings. Returns `false` for a `LATTICE_*` variable that names no key of `known_keys` (the
/// default configuration as JSON): the `LATTICE_` prefix is shared with wrapper scripts and
/// tools, so such a variable is left alone rather than refused. Keys in the file stay strict.
fn apply_env_override(
    table: &mut toml::Table,
    known_keys: &serde_json::Value,
    name: &str,
    value: &str,
) -> anyhow::Result<bool> {
    let Some(path) = name.strip_prefix("LATTICE_") else { return Ok(true) };
    if CLI_VARIABLES.contains(&name) {
        return Ok(true);
    }
    let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
    if !names_a_key(known_keys, &keys) {
        return Ok(false);
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut current = table;
    for key in parents {
        let entry = current.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current =
            entry.as_table_mut().with_context(|| format!("environment variable {name}: `{key}` is not a section"))?;
    }
    current.insert(last.clone(), parsed);
    Ok(true)
}

/// Whether `keys` is a path of sections and keys in `known_keys`.
fn names_a_key(known_keys: &serde_json::Value, keys: &[String]) -> bool {
    let mut node = known_keys;
    for key in keys {
        match node.as_object().and_then(|section| section.get(key)) {
            Some(next) => node = next,
            None => return false,
        }
    }
    !keys.is_empty()
}

/// The commented default configuration printed by `lattice config example`.
pub const EXAMPLE: &str = include_str!("../docs/lattice.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load_text(text: &str, vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lattice.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), env(vars))
    }

    #[test]
    fn no_config_at_all_gives_the_embedded_default() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.server_name.as_str(), "localhost");
        assert_eq!(config.listen.address.to_string(), "127.0.0.1:8008");
        assert_eq!(config.data_dir, PathBuf::from("./lattice-data"));
        assert_eq!(config.registration.mode, RegistrationModeConfig::Token);
    }

    #[test]
    fn the_example_file_is_the_default() {
        let example = load_text(EXAMPLE, &[]).unwrap();
        let default = Config::default();
        assert_eq!(example.server_name, default.server_name);
        assert_eq!(example.listen.address, default.listen.address);
        assert_eq!(example.auth.password_hash_memory_kib, default.auth.password_hash_memory_kib);
        assert_eq!(example.rate_limits.login_per_ip, default.rate_limits.login_per_ip);
        assert_eq!(example.storage.block_cache_mib, default.storage.block_cache_mib);
        assert_eq!(example.storage.sync_writes, default.storage.sync_writes);
        assert_eq!(example.storage.migration_chunk_rows, default.storage.migration_chunk_rows);
        assert_eq!(example.rooms.default_room_version, default.rooms.default_room_version);
        assert_eq!(example.rooms.redaction_retention, default.rooms.redaction_retention);
        assert_eq!(example.push.allow_insecure_gateways, default.push.allow_insecure_gateways);
        assert_eq!(example.user_directory.search_all_users, default.user_directory.search_all_users);
        assert_eq!(example.calls.turn_ttl, default.calls.turn_ttl);
        assert_eq!(example.media.max_upload_size, default.media.max_upload_size);
        assert_eq!(example.media.unused_upload_expiry, default.media.unused_upload_expiry);
        assert_eq!(example.media.max_user_bytes, default.media.max_user_bytes);
        assert_eq!(example.media.url_preview.enabled, default.media.url_preview.enabled);
        assert_eq!(example.media.url_preview.max_page_size, default.media.url_preview.max_page_size);
        assert_eq!(example.media.url_preview.timeout, default.media.url_preview.timeout);
        assert_eq!(example.media.url_preview.cache_ttl, default.media.url_preview.cache_ttl);
        assert_eq!(example.rate_limits.url_preview_per_user, default.rate_limits.url_preview_per_user);
        assert_eq!(example.federation.ip_range_allow, default.federation.ip_range_allow);
        assert!(example.calls.turn().unwrap().is_none());
    }

    #[test]
    fn turn_settings_must_name_one_kind_of_credentials_and_uris() {
        let base = "server_name = \"a.example\"\n[calls]\n";
        let load = |extra: &str| load_text(&format!("{base}{extra}"), &[]);
        let uris = "turn_uris = [\"turn:turn.a.example:3478\"]\n";
        assert!(load(&format!("{uris}turn_shared_secret = \"s\"\n")).unwrap().calls.turn().unwrap().is_some());
        assert!(load(&format!("{uris}turn_username = \"u\"\nturn_password = \"p\"\n")).is_ok());
        for bad in [
            format!("{uris}turn_shared_secret = \"s\"\nturn_username = \"u\"\nturn_password = \"p\"\n"),
            format!("{uris}turn_username = \"u\"\n"),
            format!("{uris}turn_shared_secret = \"\"\n"),
            "turn_shared_secret = \"s\"\n".to_owned(),
            uris.to_owned(),
            format!("{uris}turn_shared_secret = \"s\"\nturn_ttl = \"5s\"\n"),
            "turn_uris = [\"https://turn.a.example\"]\nturn_shared_secret = \"s\"\n".to_owned(),
            "livekit_service_url = \"wss://x\"\n".to_owned(),
        ] {
            let err = load(&bad).expect_err(&bad);
            assert!(format!("{err:#}").contains("calls"), "{err:#}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_by_name() {
        let err = load_text("server_name = \"a.example\"\n[listen]\nadress = \"1.2.3.4:1\"\n", &[]).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("adress"), "{message}");
        let err = load_text("lattice_bin = \"/usr/bin/lattice\"\n", &[("LATTICE_BIN", "x")]).unwrap_err();
        assert!(format!("{err:#}").contains("lattice_bin"), "{err:#}");
    }

    #[test]
    fn environment_variables_that_name_no_key_are_ignored_and_reported() {
        let config = load_text(
            "server_name = \"file.example\"\n",
            &[
                ("LATTICE_BIN", "/opt/lattice/bin/lattice"),
                ("LATTICE_LISTEN__PORT", "8448"),
                ("LATTICE_RATE_LIMITS__LOGIN_PER_IP__BURST__X", "1"),
                ("LATTICE___", "1"),
                ("LATTICE_", "1"),
                ("LATTICE_LISTEN__TRUST_X_FORWARDED_FOR", "true"),
            ],
        )
        .unwrap();
        assert_eq!(
            config.ignored_environment,
            [
                "LATTICE_BIN",
                "LATTICE_LISTEN__PORT",
                "LATTICE_RATE_LIMITS__LOGIN_PER_IP__BURST__X",
                "LATTICE___",
                "LATTICE_"
            ]
        );
        assert!(config.listen.trust_x_forwarded_for, "known keys still apply");
        // A known key with a bad value is still an error.
        let err = Config::load(None, env(&[("LATTICE_BIN", "x"), ("LATTICE_LISTEN__ADDRESS", "nowhere")])).unwrap_err();
        assert!(format!("{err:#}").contains("listen.address"), "{err:#}");
    }

    #[test]
    fn every_rate_limit_and_proxy_block_is_checked() {
        let err = load_text("[rate_limits]\nmessage_per_user = { per_second = 0.0, burst = 1 }\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("rate_limits.message_per_user"), "{err:#}");
        let err = load_text("[listen]\ntrusted_proxies = [\"10.0.0.0/40\"]\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("listen.trusted_proxies"), "{err:#}");
        let config = load_text("[listen]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\"]\n", &[]).unwrap();
        assert_eq!(config.trusted_proxies().unwrap().len(), 2);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = load_text("[listen]\naddress = \"not an address\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("listen.address"), "{err:#}");
        let err = load_text("server_name = \"bad name!\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("server_name"), "{err:#}");
        let err = load_text("[registration]\nmode = \"sometimes\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("registration.mode"), "{err:#}");
        let err = load_text("[rooms]\ndefault_room_version = \"13\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("rooms.default_room_version"), "{err:#}");
        for bad in ["7", "soon", "d", "-1d", "99999999999999999999d"] {
            let err = load_text(&format!("[rooms]\nredaction_retention = \"{bad}\"\n"), &[]).unwrap_err();
            assert!(format!("{err:#}").contains("rooms.redaction_retention"), "{bad}: {err:#}");
        }
    }

    #[test]
    fn an_s3_media_store_is_configured_by_file_and_environment_and_checked() {
        let media = |config: &Config| config.media.service_config(Path::new("/d")).unwrap();
        assert!(media(&Config::default()).s3.is_none(), "blobs on disk by default");
        let config = load_text(
            "[media.s3]\nbucket = \"media\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
             access_key_id = \"AK\"\nprefix = \"lattice/\"\n",
            &[("LATTICE_MEDIA__S3__SECRET_ACCESS_KEY", "secret")],
        )
        .unwrap();
        let s3 = media(&config).s3.expect("s3 on");
        assert_eq!((s3.bucket.as_str(), s3.region.as_str(), s3.prefix.as_str()), ("media", "us-east-1", "lattice/"));
        assert_eq!(s3.secret_access_key, "secret");
        for (text, key) in [
            ("[media.s3]\nbucket = \"m\"\naccess_key_id = \"a\"\n", "media.s3.secret_access_key"),
            (
                "[media.s3]\nbucket = \"m\"\naccess_key_id = \"a\"\nsecret_access_key = \"s\"\nendpoint = \"http://x\"\n",
                "allow_http",
            ),
            ("[media.s3]\nbucket = \"m\"\nendpoint = \"ftp://x\"\n", "media.s3.endpoint"),
        ] {
            let err = load_text(text, &[]).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
    }

    #[test]
    fn redaction_retention_takes_a_unit() {
        let retention = |text: &str| {
            load_text(&format!("[rooms]\nredaction_retention = \"{text}\"\n"), &[])
                .unwrap()
                .rooms
                .redaction_retention_ms()
                .unwrap()
        };
        assert_eq!(retention("7d"), 7 * 86_400_000);
        assert_eq!(retention("12h"), 12 * 3_600_000);
        assert_eq!(retention("30m"), 30 * 60_000);
        assert_eq!(retention("90s"), 90_000);
        assert_eq!(retention("0"), 0);
        assert_eq!(Config::default().rooms.redaction_retention_ms().unwrap(), 7 * 86_400_000);
    }

    #[test]
    fn federation_options_load_from_file_and_environment() {
        let config = Config::load(None, env(&[])).unwrap();
        assert!(config.federation.listen.is_none(), "federation is off by default");
        assert!(config.federation.verify_peer_tls);
        assert!(config.federation.trusted_key_servers.is_empty());
        let config = load_text(
            "[federation]\nlisten = \"127.0.0.1:8448\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
             resolve = { \"lat2.test\" = \"127.0.0.2:8448\" }\n",
            &[
                ("LATTICE_FEDERATION__VERIFY_PEER_TLS", "false"),
                ("LATTICE_FEDERATION__TRUSTED_CA", "/etc/ca.pem"),
                ("LATTICE_FEDERATION__TRUSTED_KEY_SERVERS", "[\"notary.example\"]"),
                ("LATTICE_FEDERATION__KEY_VALID_FOR", "2h"),
            ],
        )
        .unwrap();
        let federation = &config.federation;
        assert_eq!(federation.listen, Some("127.0.0.1:8448".parse().unwrap()));
        assert!(!federation.verify_peer_tls);
        assert_eq!(federation.trusted_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(federation.notaries().unwrap()[0].as_str(), "notary.example");
        assert_eq!(federation.resolve["lat2.test"], "127.0.0.2:8448".parse().unwrap());
        assert_eq!(federation.key_valid_for_ms().unwrap(), 2 * 3_600_000);
        let config =
            Config::load(None, env(&[("LATTICE_FEDERATION__RESOLVE", "{ \"lat3.test\" = \"127.0.0.3:1\" }")])).unwrap();
        assert_eq!(config.federation.resolve.len(), 1);

        let err = load_text("[federation]\nlisten = \"127.0.0.1:8448\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("federation.tls_cert"), "{err:#}");
        let err = load_text("[federation]\ntrusted_key_servers = [\"not a name\"]\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("federation.trusted_key_servers"), "{err:#}");
        let err = load_text("[federation]\nkey_valid_for = \"30d\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("federation.key_valid_for"), "{err:#}");
        let err = load_text("[federation]\nresolve = { \"bad name\" = \"127.0.0.1:1\" }\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("federation.resolve"), "{err:#}");
        let err = load_text("[federation]\nlisten_on = \"x\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("listen_on"), "{err:#}");
    }

    #[test]
    fn address_policies_and_url_previews_load_and_are_checked() {
        let config = Config::load(None, env(&[])).unwrap();
        assert!(config.media.service_config(Path::new("/d")).unwrap().url_preview.is_none(), "previews are off");
        let config = load_text(
            "[federation]\nip_range_allow = [\"127.0.0.0/8\"]\n[media.url_preview]\nmax_page_size = 4096\n",
            &[
                ("LATTICE_MEDIA__URL_PREVIEW__ENABLED", "true"),
                ("LATTICE_MEDIA__URL_PREVIEW__IP_RANGE_ALLOW", "[\"10.1.0.0/16\", \"fd00::1\"]"),
                ("LATTICE_MEDIA__URL_PREVIEW__CACHE_TTL", "1h"),
                ("LATTICE_FEDERATION__IP_RANGE_DENY", "[\"8.8.8.0/24\"]"),
            ],
        )
        .unwrap();
        let federation = config.federation.address_policy().unwrap();
        assert!(federation.permits("127.0.0.1".parse().unwrap()));
        assert!(!federation.permits("8.8.8.8".parse().unwrap()));
        assert!(!federation.permits("10.1.0.1".parse().unwrap()));
        let preview = config.media.service_config(Path::new("/d")).unwrap().url_preview.expect("previews on");
        assert_eq!((preview.max_page_bytes, preview.cache_ttl_ms), (4096, 3_600_000));
        assert!(preview.policy.permits("10.1.0.1".parse().unwrap()));
        assert!(!preview.policy.permits("127.0.0.1".parse().unwrap()), "each policy has its own allow list");

        for (text, key) in [
            ("[federation]\nip_range_deny = [\"10.0.0.0/40\"]\n", "federation.ip_range_deny"),
            ("[federation]\nip_range_allow = [\"localhost\"]\n", "federation.ip_range_allow"),
            ("[media.url_preview]\nip_range_allow = [\"x\"]\n", "media.url_preview.ip_range_allow"),
            ("[media.url_preview]\ntimeout = \"1h\"\n", "media.url_preview.timeout"),
            ("[media.url_preview]\ncache_ttl = \"soon\"\n", "media.url_preview.cache_ttl"),
            ("[media.url_preview]\nimage_retention = \"1h\"\n", "media.url_preview.image_retention"),
            ("[media.url_preview]\nmax_page_size = 10\n", "media.url_preview.max_page_size"),
            ("[media.url_preview]\nenable = true\n", "enable"),
        ] {
            let err = load_text(text, &[]).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load_text(
            "server_name = \"file.example\"\n",
            &[
                ("LATTICE_SERVER_NAME", "env.example"),
                ("LATTICE_LISTEN__ADDRESS", "127.0.0.2:9000"),
                ("LATTICE_RATE_LIMITS__ENABLED", "false"),
                ("LATTICE_CONFIG", "ignored.toml"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.server_name.as_str(), "env.example");
        assert_eq!(config.listen.address.to_string(), "127.0.0.2:9000");
        assert!(!config.rate_limits.enabled);
    }
}
