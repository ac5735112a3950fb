//! Server discovery: from a server name to an address, a `Host` header and the name the peer's
//! certificate must be valid for (server-server API v1.16, "Resolving server names").
//!
//! The decisions are pure functions ([`first_step`], [`delegated_step`], [`srv_step`],
//! [`parse_well_known`], [`well_known_cache_ms`]), tested from tables. [`Discovery`] runs them
//! against a [`NameResolver`] (DNS) and a [`WellKnownFetcher`] (HTTPS), both injectable, plus a
//! static override map that pins names to addresses without DNS (test networks, split-horizon
//! setups).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ruma::ServerName;

use crate::address_policy::AddressPolicy;
use crate::bounded::BoundedMap;
use crate::clock::Clock;
use crate::error::{FederationError, Result};

/// The port federation uses when neither the server name, its delegation nor SRV names one.
pub const DEFAULT_FEDERATION_PORT: u16 = 8448;
/// The spec's recommended cache time for a `.well-known` answer without cache headers.
pub const WELL_KNOWN_DEFAULT_CACHE_MS: u64 = 24 * 3600 * 1000;
/// The spec's recommended upper bound on caching a `.well-known` answer.
pub const WELL_KNOWN_MAX_CACHE_MS: u64 = 48 * 3600 * 1000;
/// First cache time of a failed `.well-known` fetch; it doubles per consecutive failure.
pub const WELL_KNOWN_ERROR_FIRST_CACHE_MS: u64 = 5 * 60 * 1000;
/// Failed fetches are cached "for up to an hour" (the spec).
pub const WELL_KNOWN_ERROR_MAX_CACHE_MS: u64 = 3600 * 1000;
/// The largest `.well-known/matrix/server` body read.
pub const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;
/// How many server names' `.well-known` answers are kept in memory.
pub const WELL_KNOWN_CACHE_ENTRIES: usize = 10_000;
/// At most this many SRV targets are tried for one name.
pub const MAX_SRV_TARGETS: usize = 8;

/// Where to connect: an address, or a host name still to resolve with AAAA/A records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    Host(String),
}

/// The outcome of discovery for one server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub target: Target,
    pub port: u16,
    /// The `Host` header every request to this server carries.
    pub host_header: String,
    /// The name (or IP address) the server's certificate must be valid for; also the TLS SNI
    /// when it is a name.
    pub tls_name: String,
}

/// An endpoint with the socket addresses its target resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub endpoint: Endpoint,
    pub addrs: Vec<SocketAddr>,
}

/// The host and optional port of a server name (or of a delegated name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameParts {
    pub host: HostPart,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPart {
    Ip(IpAddr),
    Name(String),
}

impl HostPart {
    /// The host as a certificate names it: an IP without brackets, or the DNS name.
    pub fn tls_name(&self) -> String {
        match self {
            HostPart::Ip(ip) => ip.to_string(),
            HostPart::Name(name) => name.clone(),
        }
    }
}

/// Splits a server name into host and port, checking the spec's grammar.
pub fn split_server_name(name: &str) -> Result<NameParts> {
    let invalid = || FederationError::InvalidServerName(name.to_owned());
    <&ServerName>::try_from(name).map_err(|_| invalid())?;
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(invalid)?;
        let ip: std::net::Ipv6Addr = inside.parse().map_err(|_| invalid())?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(invalid)?),
        };
        (HostPart::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        };
        let host = match host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => HostPart::Ip(IpAddr::V4(ip)),
            Err(_) => HostPart::Name(host.to_ascii_lowercase()),
        };
        (host, port)
    };
    let port = match port {
        None => None,
        Some(text) => Some(text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(invalid)?),
    };
    Ok(NameParts { host, port })
}

/// Steps 1 and 2: an IP literal or an explicit port needs no lookup of delegation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstStep {
    Done(Endpoint),
    /// Step 3: ask `https://<hostname>/.well-known/matrix/server`.
    WellKnown {
        hostname: String,
    },
}

pub fn first_step(server_name: &str) -> Result<FirstStep> {
    let parts = split_server_name(server_name)?;
    Ok(match (parts.host, parts.port) {
        (HostPart::Ip(ip), port) => FirstStep::Done(Endpoint {
            target: Target::Ip(ip),
            port: port.unwrap_or(DEFAULT_FEDERATION_PORT),
            host_header: server_name.to_owned(),
            tls_name: ip.to_string(),
        }),
        (HostPart::Name(host), Some(port)) => FirstStep::Done(Endpoint {
            target: Target::Host(host.clone()),
            port,
            host_header: server_name.to_owned(),
            tls_name: host,
        }),
        (HostPart::Name(hostname), None) => FirstStep::WellKnown { hostname },
    })
}

/// Steps 3.1–3.2: what a valid `m.server` delegation leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delegated {
    Done(Endpoint),
    /// Steps 3.3–3.5: look up SRV records for the delegated host name.
    Srv {
        hostname: String,
    },
}

pub fn delegated_step(m_server: &str) -> Result<Delegated> {
    let parts = split_server_name(m_server)?;
    Ok(match (parts.host, parts.port) {
        (HostPart::Ip(ip), port) => Delegated::Done(Endpoint {
            target: Target::Ip(ip),
            port: port.unwrap_or(DEFAULT_FEDERATION_PORT),
            host_header: m_server.to_owned(),
            tls_name: ip.to_string(),
        }),
        (HostPart::Name(host), Some(port)) => Delegated::Done(Endpoint {
            target: Target::Host(host.clone()),
            port,
            host_header: m_server.to_owned(),
            tls_name: host,
        }),
        (HostPart::Name(hostname), None) => Delegated::Srv { hostname },
    })
}

/// One target of an SRV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub host: String,
    pub port: u16,
}

/// Steps 3.3–3.5 and 4–6: the endpoint for `hostname` given the SRV target found (if any).
/// The `Host` header and the certificate name stay `hostname` whatever SRV points at: DNS is
/// not trusted to delegate, TLS proves the target may speak for the name.
pub fn srv_step(hostname: &str, srv: Option<&SrvTarget>) -> Endpoint {
    let (target, port) = match srv {
        Some(srv) => {
            let host = srv.host.trim_end_matches('.');
            let target = match host.parse::<IpAddr>() {
                Ok(ip) => Target::Ip(ip),
                Err(_) => Target::Host(host.to_ascii_lowercase()),
            };
            (target, srv.port)
        }
        None => (Target::Host(hostname.to_owned()), DEFAULT_FEDERATION_PORT),
    };
    Endpoint { target, port, host_header: hostname.to_owned(), tls_name: hostname.to_owned() }
}

/// The SRV names to try for a host name, in the spec's order.
pub fn srv_names(hostname: &str) -> [String; 2] {
    [format!("_matrix-fed._tcp.{hostname}"), format!("_matrix._tcp.{hostname}")]
}

/// Orders SRV targets as RFC 2782 asks (lowest priority first; within a priority, heavier
/// first), drops the "service not available" target `.`, and keeps at most
/// [`MAX_SRV_TARGETS`]. Deterministic, so tests and logs are reproducible.
pub fn order_srv_targets(mut targets: Vec<SrvTarget>) -> Vec<SrvTarget> {
    targets.retain(|t| !t.host.trim_end_matches('.').is_empty());
    targets.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)).then(a.host.cmp(&b.host)));
    targets.truncate(MAX_SRV_TARGETS);
    targets
}

/// The `m.server` of a `.well-known/matrix/server` answer, or why the answer is invalid.
pub fn parse_well_known(status: u16, body: &[u8]) -> Result<String, String> {
    if status != 200 {
        return Err(format!("status {status}"));
    }
    if body.len() > WELL_KNOWN_MAX_BYTES {
        return Err("body too large".to_owned());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let m_server = value.get("m.server").and_then(|v| v.as_str()).ok_or("no string `m.server`")?;
    split_server_name(m_server).map_err(|_| format!("`m.server` {m_server:?} is not a server name"))?;
    Ok(m_server.to_owned())
}

/// How long a `.well-known` answer is cached: its `Cache-Control` max-age (no longer than 48
/// hours; `no-store`/`no-cache` as zero), else 24 hours. Failed fetches: 5 minutes, doubling
/// with each consecutive failure, at most an hour.
pub fn well_known_cache_ms(success: bool, cache_control: Option<&str>, consecutive_failures: u32) -> u64 {
    if !success {
        let doublings = consecutive_failures.saturating_sub(1).min(16);
        return WELL_KNOWN_ERROR_FIRST_CACHE_MS.saturating_mul(1 << doublings).min(WELL_KNOWN_ERROR_MAX_CACHE_MS);
    }
    let Some(header) = cache_control else {
        return WELL_KNOWN_DEFAULT_CACHE_MS;
    };
    let mut max_age = None;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return 0;
        }
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            max_age = seconds.trim_matches('"').parse::<u64>().ok();
        }
    }
    match max_age {
        Some(seconds) => seconds.saturating_mul(1000).min(WELL_KNOWN_MAX_CACHE_MS),
        None => WELL_KNOWN_DEFAULT_CACHE_MS,
    }
}

/// DNS, as discovery needs it.
#[async_trait]
pub trait NameResolver: Send + Sync {
    /// The SRV targets of `name` (e.g. `_matrix-fed._tcp.example.org`); empty when none.
    async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, String>;
    /// The AAAA and A records of `host` (CNAMEs followed).
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, String>;
}

/// What a `GET https://<hostname>/.well-known/matrix/server` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WellKnownResponse {
    /// The HTTP status, or the transport error.
    pub status: Result<u16, String>,
    pub body: Vec<u8>,
    pub cache_control: Option<String>,
}

#[async_trait]
pub trait WellKnownFetcher: Send + Sync {
    async fn fetch(&self, hostname: &str) -> WellKnownResponse;
}

#[derive(Clone, Debug)]
struct CachedWellKnown {
    delegation: Option<String>,
    expires_ms: u64,
    consecutive_failures: u32,
}

/// Runs discovery, with the `.well-known` cache, the static overrides and the outbound address
/// policy.
pub struct Discovery {
    overrides: HashMap<String, SocketAddr>,
    policy: Arc<AddressPolicy>,
    resolver: Arc<dyn NameResolver>,
    well_known: Arc<dyn WellKnownFetcher>,
    cache: Mutex<BoundedMap<String, CachedWellKnown>>,
    clock: Arc<dyn Clock>,
}

impl Discovery {
    /// `overrides` pins server names (exactly as written, port included if any) to addresses:
    /// no DNS and no `.well-known` for them; `Host` and the certificate name stay the server
    /// name's host. Every other address discovery finds — an IP-literal server name or
    /// delegation, DNS answers — must be permitted by `policy`; the pins are the operator's
    /// own word and are not checked.
    pub fn new(
        overrides: HashMap<String, SocketAddr>,
        policy: Arc<AddressPolicy>,
        resolver: Arc<dyn NameResolver>,
        well_known: Arc<dyn WellKnownFetcher>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            overrides,
            policy,
            resolver,
            well_known,
            cache: Mutex::new(BoundedMap::new(WELL_KNOWN_CACHE_ENTRIES)),
            clock,
        }
    }

    /// The endpoint and addresses of `server_name`.
    pub async fn resolve(&self, server_name: &str) -> Result<Resolved> {
        if let Some(addr) = self.overrides.get(server_name) {
            let parts = split_server_name(server_name)?;
            let endpoint = Endpoint {
                target: Target::Ip(addr.ip()),
                port: addr.port(),
                host_header: server_name.to_owned(),
                tls_name: parts.host.tls_name(),
            };
            return Ok(Resolved { endpoint, addrs: vec![*addr] });
        }
        let endpoint = match first_step(server_name)? {
            FirstStep::Done(endpoint) => endpoint,
            FirstStep::WellKnown { hostname } => match self.delegation(&hostname).await {
                Some(m_server) => match delegated_step(&m_server)? {
                    Delegated::Done(endpoint) => endpoint,
                    Delegated::Srv { hostname: delegated } => self.via_srv(&delegated).await,
                },
                None => self.via_srv(&hostname).await,
            },
        };
        let addrs = self.addresses(server_name, &endpoint).await?;
        Ok(Resolved { endpoint, addrs })
    }

    async fn addresses(&self, server_name: &str, endpoint: &Endpoint) -> Result<Vec<SocketAddr>> {
        let ips = match &endpoint.target {
            Target::Ip(ip) => vec![*ip],
            Target::Host(host) => self
                .resolver
                .ips(host)
                .await
                .map_err(|detail| FederationError::Resolve { server: server_name.to_owned(), detail })?,
        };
        if ips.is_empty() {
            return Err(FederationError::Resolve { server: server_name.to_owned(), detail: "no addresses".into() });
        }
        let permitted: Vec<SocketAddr> =
            ips.iter().filter(|ip| self.policy.permits(**ip)).map(|ip| SocketAddr::new(*ip, endpoint.port)).collect();
        if permitted.is_empty() {
            tracing::info!(
                server = server_name,
                ?ips,
                "not contacted: every address is denied by federation.ip_range_deny"
            );
            return Err(FederationError::AddressDenied(server_name.to_owned()));
        }
        Ok(permitted)
    }

    /// Steps 3.3–3.5 / 4–6: the first SRV target that has addresses, else the name on 8448.
    async fn via_srv(&self, hostname: &str) -> Endpoint {
        for name in srv_names(hostname) {
            let targets = match self.resolver.srv(&name).await {
                Ok(targets) => order_srv_targets(targets),
                Err(error) => {
                    tracing::debug!(%name, %error, "SRV lookup failed");
                    Vec::new()
                }
            };
            if let Some(first) = targets.first() {
                return srv_step(hostname, Some(first));
            }
        }
        srv_step(hostname, None)
    }

    /// The cached or fetched `m.server` of `hostname`; `None` when its `.well-known` is an error.
    async fn delegation(&self, hostname: &str) -> Option<String> {
        let now = self.clock.now_ms();
        let previous = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.get(hostname).cloned()
        };
        if let Some(cached) = &previous
            && cached.expires_ms > now
        {
            return cached.delegation.clone();
        }
        let response = self.well_known.fetch(hostname).await;
        let parsed = match &response.status {
            Ok(status) => parse_well_known(*status, &response.body),
            Err(error) => Err(error.clone()),
        };
        let failures = match (&parsed, &previous) {
            (Ok(_), _) => 0,
            (Err(_), Some(previous)) if previous.delegation.is_none() => {
                previous.consecutive_failures.saturating_add(1)
            }
            (Err(_), _) => 1,
        };
        if let Err(error) = &parsed {
            tracing::debug!(%hostname, %error, "no valid .well-known/matrix/server");
        }
        let cache_ms = well_known_cache_ms(parsed.is_ok(), response.cache_control.as_deref(), failures);
        let delegation = parsed.ok();
        let entry = CachedWellKnown {
            delegation: delegation.clone(),
            expires_ms: now.saturating_add(cache_ms),
            consecutive_failures: failures,
        };
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(hostname.to_owned(), entry, now);
        delegation
    }
}

/// DNS through hickory-resolver with the system's configuration (its own cache honours TTLs).
pub struct HickoryResolver {
    resolver: hickory_resolver::TokioResolver,
}

impl HickoryResolver {
    pub fn from_system() -> Result<Self> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|builder| builder.build())
            .map_err(|e| FederationError::Invalid(format!("reading the system's DNS configuration: {e}")))?;
        Ok(Self { resolver })
    }
}

#[async_trait]
impl NameResolver for HickoryResolver {
    async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, String> {
        let lookup = match self.resolver.srv_lookup(format!("{name}.")).await {
            Ok(lookup) => lookup,
            // NXDOMAIN and "no records" are the common case, not failures.
            Err(error) if error.is_no_records_found() || error.is_nx_domain() => return Ok(Vec::new()),
            Err(error) => return Err(error.to_string()),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::SRV(srv) => Some(SrvTarget {
                    priority: srv.priority,
                    weight: srv.weight,
                    host: srv.target.to_ascii(),
                    port: srv.port,
                }),
                _ => None,
            })
            .collect())
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let lookup = self.resolver.lookup_ip(host).await.map_err(|e| e.to_string())?;
        Ok(lookup.iter().collect())
    }
}

/// No DNS at all (the system's configuration could not be read): only IP literals and
/// pinned names resolve.
pub struct NoDns;

#[async_trait]
impl NameResolver for NoDns {
    async fn srv(&self, _name: &str) -> Result<Vec<SrvTarget>, String> {
        Ok(Vec::new())
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        Err(format!("no DNS resolver is configured to look up {host}"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::*;

    fn ip(text: &str) -> Target {
        Target::Ip(text.parse().unwrap())
    }

    fn host(text: &str) -> Target {
        Target::Host(text.to_owned())
    }

    fn endpoint(target: Target, port: u16, host_header: &str, tls_name: &str) -> Endpoint {
        Endpoint { target, port, host_header: host_header.into(), tls_name: tls_name.into() }
    }

    #[test]
    fn first_step_follows_the_spec_for_ip_literals_and_explicit_ports() {
        let cases = [
            ("1.2.3.4", FirstStep::Done(endpoint(ip("1.2.3.4"), 8448, "1.2.3.4", "1.2.3.4"))),
            ("1.2.3.4:8000", FirstStep::Done(endpoint(ip("1.2.3.4"), 8000, "1.2.3.4:8000", "1.2.3.4"))),
            ("[::1]", FirstStep::Done(endpoint(ip("::1"), 8448, "[::1]", "::1"))),
            (
                "[2001:db8::1]:443",
                FirstStep::Done(endpoint(ip("2001:db8::1"), 443, "[2001:db8::1]:443", "2001:db8::1")),
            ),
            (
                "example.org:8449",
                FirstStep::Done(endpoint(host("example.org"), 8449, "example.org:8449", "example.org")),
            ),
            ("example.org", FirstStep::WellKnown { hostname: "example.org".into() }),
            ("Example.ORG", FirstStep::WellKnown { hostname: "example.org".into() }),
        ];
        for (name, expected) in cases {
            assert_eq!(first_step(name).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn malformed_server_names_are_refused() {
        for name in ["", "example.org:", "example.org:0", "example.org:70000", "[::1", "[::1]x", "a b", "http://x"] {
            assert!(first_step(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn delegation_follows_steps_3_1_to_3_3() {
        let cases = [
            ("10.0.0.1", Delegated::Done(endpoint(ip("10.0.0.1"), 8448, "10.0.0.1", "10.0.0.1"))),
            ("10.0.0.1:99", Delegated::Done(endpoint(ip("10.0.0.1"), 99, "10.0.0.1:99", "10.0.0.1"))),
            (
                "matrix.example.org:443",
                Delegated::Done(endpoint(
                    host("matrix.example.org"),
                    443,
                    "matrix.example.org:443",
                    "matrix.example.org",
                )),
            ),
            ("matrix.example.org", Delegated::Srv { hostname: "matrix.example.org".into() }),
        ];
        for (m_server, expected) in cases {
            assert_eq!(delegated_step(m_server).unwrap(), expected, "{m_server}");
        }
    }

    #[test]
    fn srv_targets_change_the_address_but_not_host_or_certificate_name() {
        let srv = SrvTarget { priority: 10, weight: 5, host: "fed.example.net.".into(), port: 8443 };
        assert_eq!(
            srv_step("example.org", Some(&srv)),
            endpoint(host("fed.example.net"), 8443, "example.org", "example.org")
        );
        assert_eq!(srv_step("example.org", None), endpoint(host("example.org"), 8448, "example.org", "example.org"));
        assert_eq!(srv_names("example.org"), ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]);
    }

    #[test]
    fn srv_targets_are_ordered_by_priority_then_weight_and_dot_is_dropped() {
        let t = |priority, weight, host: &str| SrvTarget { priority, weight, host: host.into(), port: 1 };
        let ordered = order_srv_targets(vec![t(20, 100, "c."), t(10, 1, "b."), t(10, 50, "a."), t(0, 0, ".")]);
        let hosts: Vec<&str> = ordered.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, ["a.", "b.", "c."]);
    }

    #[test]
    fn well_known_answers_are_parsed_strictly() {
        let cases: [(u16, &str, Result<&str, ()>); 7] = [
            (200, r#"{"m.server":"matrix.example.org:443"}"#, Ok("matrix.example.org:443")),
            (200, r#"{"m.server":"matrix.example.org"}"#, Ok("matrix.example.org")),
            (404, r#"{"m.server":"matrix.example.org"}"#, Err(())),
            (200, "not json", Err(())),
            (200, r#"{"m.server":5}"#, Err(())),
            (200, r#"{"m.server":"https://matrix.example.org"}"#, Err(())),
            (200, r#"{}"#, Err(())),
        ];
        for (status, body, expected) in cases {
            let got = parse_well_known(status, body.as_bytes());
            assert_eq!(got.as_deref().map_err(|_| ()), expected, "{status} {body}");
        }
    }

    #[test]
    fn well_known_cache_lifetimes_follow_the_spec() {
        let hour = 3600 * 1000;
        let cases: [(bool, Option<&str>, u32, u64); 9] = [
            (true, None, 0, 24 * hour),
            (true, Some("max-age=600"), 0, 600_000),
            (true, Some("public, max-age=3600"), 0, hour),
            (true, Some("max-age=9999999"), 0, 48 * hour),
            (true, Some("no-store"), 0, 0),
            (true, Some("private"), 0, 24 * hour),
            (false, None, 1, 5 * 60 * 1000),
            (false, Some("max-age=99999"), 2, 10 * 60 * 1000),
            (false, None, 40, hour),
        ];
        for (success, header, failures, expected) in cases {
            assert_eq!(well_known_cache_ms(success, header, failures), expected, "{success} {header:?} {failures}");
        }
    }

    struct FakeDns {
        srv: HashMap<String, Vec<SrvTarget>>,
        ips: HashMap<String, Vec<IpAddr>>,
    }

    #[async_trait]
    impl NameResolver for FakeDns {
        async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, String> {
            Ok(self.srv.get(name).cloned().unwrap_or_default())
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, String> {
            self.ips.get(host).cloned().ok_or_else(|| "NXDOMAIN".to_owned())
        }
    }

    struct FakeWellKnown {
        answers: HashMap<String, WellKnownResponse>,
        fetches: AtomicUsize,
    }

    #[async_trait]
    impl WellKnownFetcher for FakeWellKnown {
        async fn fetch(&self, hostname: &str) -> WellKnownResponse {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.answers.get(hostname).cloned().unwrap_or(WellKnownResponse {
                status: Err("connection refused".into()),
                body: Vec::new(),
                cache_control: None,
            })
        }
    }

    struct FakeClock(AtomicU64);

    impl Clock for FakeClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn delegation(m_server: &str, cache_control: Option<&str>) -> WellKnownResponse {
        WellKnownResponse {
            status: Ok(200),
            body: format!(r#"{{"m.server":"{m_server}"}}"#).into_bytes(),
            cache_control: cache_control.map(str::to_owned),
        }
    }

    fn world() -> (Discovery, Arc<FakeWellKnown>, Arc<FakeClock>) {
        let srv = |host: &str, port| vec![SrvTarget { priority: 0, weight: 0, host: host.into(), port }];
        let dns = FakeDns {
            srv: HashMap::from([
                ("_matrix-fed._tcp.delegated.example".to_owned(), srv("fed-target.example.", 9000)),
                ("_matrix._tcp.legacy.example".to_owned(), srv("legacy-target.example.", 9001)),
                ("_matrix-fed._tcp.plain-srv.example".to_owned(), srv("srv-target.example.", 9002)),
            ]),
            ips: HashMap::from([
                ("fed-target.example".to_owned(), vec!["10.0.0.10".parse().unwrap()]),
                ("legacy-target.example".to_owned(), vec!["10.0.0.11".parse().unwrap()]),
                ("srv-target.example".to_owned(), vec!["10.0.0.12".parse().unwrap()]),
                ("ported.example".to_owned(), vec!["10.0.0.13".parse().unwrap()]),
                ("nothing.example".to_owned(), vec!["10.0.0.14".parse().unwrap(), "::14".parse().unwrap()]),
            ]),
        };
        let well_known = Arc::new(FakeWellKnown {
            answers: HashMap::from([
                ("wk.example".to_owned(), delegation("delegated.example", Some("max-age=60"))),
                ("wk-legacy.example".to_owned(), delegation("legacy.example", None)),
                ("wk-port.example".to_owned(), delegation("ported.example:7000", None)),
                ("wk-ip.example".to_owned(), delegation("10.0.0.99", None)),
            ]),
            fetches: AtomicUsize::new(0),
        });
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let overrides = HashMap::from([("pinned.test".to_owned(), "127.0.0.2:8448".parse().unwrap())]);
        // The fake network lives in private ranges: allowed here; the policy has its own test.
        let policy =
            AddressPolicy::from_config(&[], &["10.0.0.0/8".into(), "127.0.0.0/8".into(), "::/96".into()]).unwrap();
        let discovery = Discovery::new(overrides, Arc::new(policy), Arc::new(dns), well_known.clone(), clock.clone());
        (discovery, well_known, clock)
    }

    #[tokio::test]
    async fn discovery_walks_the_whole_order() {
        let (discovery, _, _) = world();
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let cases = [
            (
                "pinned.test",
                endpoint(ip("127.0.0.2"), 8448, "pinned.test", "pinned.test"),
                vec![addr("127.0.0.2:8448")],
            ),
            (
                "wk.example",
                endpoint(host("fed-target.example"), 9000, "delegated.example", "delegated.example"),
                vec![addr("10.0.0.10:9000")],
            ),
            (
                "wk-legacy.example",
                endpoint(host("legacy-target.example"), 9001, "legacy.example", "legacy.example"),
                vec![addr("10.0.0.11:9001")],
            ),
            (
                "wk-port.example",
                endpoint(host("ported.example"), 7000, "ported.example:7000", "ported.example"),
                vec![addr("10.0.0.13:7000")],
            ),
            ("wk-ip.example", endpoint(ip("10.0.0.99"), 8448, "10.0.0.99", "10.0.0.99"), vec![addr("10.0.0.99:8448")]),
            (
                "plain-srv.example",
                endpoint(host("srv-target.example"), 9002, "plain-srv.example", "plain-srv.example"),
                vec![addr("10.0.0.12:9002")],
            ),
            (
                "nothing.example",
                endpoint(host("nothing.example"), 8448, "nothing.example", "nothing.example"),
                vec![addr("10.0.0.14:8448"), addr("[::14]:8448")],
            ),
            (
                "127.0.0.5:1234",
                endpoint(ip("127.0.0.5"), 1234, "127.0.0.5:1234", "127.0.0.5"),
                vec![addr("127.0.0.5:1234")],
            ),
        ];
        for (name, expected, addrs) in cases {
            let resolved = discovery.resolve(name).await.unwrap();
            assert_eq!(resolved, Resolved { endpoint: expected, addrs }, "{name}");
        }
        assert!(matches!(discovery.resolve("unknown.example").await, Err(FederationError::Resolve { .. })));
    }

    #[tokio::test]
    async fn well_known_answers_and_errors_are_cached_for_their_lifetimes() {
        let (discovery, fetcher, clock) = world();
        discovery.resolve("wk.example").await.unwrap();
        discovery.resolve("wk.example").await.unwrap();
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1, "cached for max-age=60");
        clock.0.fetch_add(61_000, Ordering::SeqCst);
        discovery.resolve("wk.example").await.unwrap();
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 2, "fetched again after max-age");

        discovery.resolve("nothing.example").await.unwrap();
        discovery.resolve("nothing.example").await.unwrap();
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 3, "an error is cached too");
        clock.0.fetch_add(5 * 60 * 1000 + 1, Ordering::SeqCst);
        discovery.resolve("nothing.example").await.unwrap();
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 4);
        // The second consecutive failure is cached twice as long.
        clock.0.fetch_add(5 * 60 * 1000 + 1, Ordering::SeqCst);
        discovery.resolve("nothing.example").await.unwrap();
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn denied_addresses_are_never_returned_but_operator_pins_are_trusted() {
        let dns = FakeDns {
            srv: HashMap::new(),
            ips: HashMap::from([
                ("internal.example".to_owned(), vec!["10.1.2.3".parse().unwrap(), "::ffff:127.0.0.1".parse().unwrap()]),
                ("mixed.example".to_owned(), vec!["192.168.0.9".parse().unwrap(), "93.184.216.34".parse().unwrap()]),
            ]),
        };
        let well_known = Arc::new(FakeWellKnown {
            answers: HashMap::from([
                ("delegates-inside.example".to_owned(), delegation("internal.example", None)),
                ("delegates-to-ip.example".to_owned(), delegation("169.254.169.254:443", None)),
            ]),
            fetches: AtomicUsize::new(0),
        });
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let overrides = HashMap::from([("pinned.test".to_owned(), "127.0.0.2:8448".parse().unwrap())]);
        let discovery = Discovery::new(overrides, Arc::new(AddressPolicy::default()), Arc::new(dns), well_known, clock);
        for name in [
            "internal.example",
            "delegates-inside.example",
            "delegates-to-ip.example",
            "127.0.0.1:8448",
            "[::1]:8448",
            "10.0.0.1",
        ] {
            assert!(
                matches!(discovery.resolve(name).await, Err(FederationError::AddressDenied(_))),
                "{name} must not resolve to a denied address"
            );
        }
        let mixed = discovery.resolve("mixed.example").await.unwrap();
        assert_eq!(mixed.addrs, vec!["93.184.216.34:8448".parse::<SocketAddr>().unwrap()], "only the public address");
        let pinned = discovery.resolve("pinned.test").await.unwrap();
        assert_eq!(
            pinned.addrs,
            vec!["127.0.0.2:8448".parse::<SocketAddr>().unwrap()],
            "the operator's pin is trusted"
        );
    }
}
