//! Which IP addresses this server may connect to on another party's say-so: the outbound
//! address policy that federation, `.well-known` fetches, URL previews and remote media
//! redirects share (server-side request forgery protection).
//!
//! A built-in deny list covers every range that is not the public internet — loopback,
//! RFC 1918 private networks, CGNAT, link-local, unique-local, multicast, broadcast, reserved,
//! documentation and benchmarking ranges. IPv6 addresses that carry an IPv4 address
//! (IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`,
//! Teredo `2001::/32`) are judged by that IPv4 address too, so `::ffff:10.0.0.1` is as private as
//! `10.0.0.1`. The operator adds ranges to deny and ranges to allow; an allowed range wins over
//! every deny (that is how a test network on loopback, or a homeserver in the same private
//! network, is reached).
//!
//! Pure logic: no I/O. The resolver hooks that apply it live with the clients.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The ranges denied unless allowed: not the public internet (IANA special-purpose registries).
const DEFAULT_DENY: &[&str] = &[
    // IPv4
    "0.0.0.0/8",       // "this network", unspecified
    "10.0.0.0/8",      // RFC 1918
    "100.64.0.0/10",   // carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata services live here)
    "172.16.0.0/12",   // RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "192.88.99.0/24",  // 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  // RFC 1918
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    // IPv6
    "::/96",          // unspecified, loopback and the deprecated IPv4-compatible form
    "64:ff9b:1::/48", // local-use NAT64 (RFC 8215)
    "100::/64",       // discard-only
    "2001:2::/48",    // benchmarking
    "2001:db8::/32",  // documentation
    "3fff::/20",      // documentation (RFC 9637)
    "fc00::/7",       // unique-local
    "fe80::/10",      // link-local
    "fec0::/10",      // site-local (deprecated)
    "ff00::/8",       // multicast
];

/// Where connections may go. Cheap to clone behind an `Arc`.
#[derive(Clone, Debug)]
pub struct AddressPolicy {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl Default for AddressPolicy {
    /// The built-in deny list, nothing allowed on top.
    fn default() -> Self {
        Self { deny: default_deny(), allow: Vec::new() }
    }
}

fn default_deny() -> Vec<IpNet> {
    DEFAULT_DENY.iter().map(|block| block.parse().expect("the built-in deny list holds CIDR blocks")).collect()
}

/// Parses CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or bare addresses (a /32 or /128).
pub fn parse_blocks(blocks: &[String]) -> Result<Vec<IpNet>, String> {
    blocks
        .iter()
        .map(|block| {
            let text = block.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{block:?} is not a CIDR block or IP address"))
        })
        .collect()
}

impl AddressPolicy {
    /// The built-in deny list plus `extra_deny`, with `allow` winning over both.
    pub fn new(extra_deny: Vec<IpNet>, allow: Vec<IpNet>) -> Self {
        let mut deny = default_deny();
        deny.extend(extra_deny);
        Self { deny, allow }
    }

    /// [`AddressPolicy::new`] from configuration text; the error names the bad entry.
    pub fn from_config(extra_deny: &[String], allow: &[String]) -> Result<Self, String> {
        Ok(Self::new(parse_blocks(extra_deny)?, parse_blocks(allow)?))
    }

    /// Whether a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        if self.allowed(ip) || self.allowed(canonical) {
            return true;
        }
        if self.denied(ip) || self.denied(canonical) {
            return false;
        }
        // An IPv6 address that carries an IPv4 one reaches that IPv4 host through a gateway:
        // judge it by the carried address (allowed there if that address is allowed).
        match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).into_iter().all(|v4| {
                let v4 = IpAddr::V4(v4);
                self.allowed(v4) || !self.denied(v4)
            }),
            IpAddr::V4(_) => true,
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(&ip))
    }

    fn denied(&self, ip: IpAddr) -> bool {
        self.deny.iter().any(|net| net.contains(&ip))
    }
}

/// The IPv4 addresses an IPv6 address carries: IPv4-mapped and IPv4-translated (the low 32
/// bits), NAT64 (`64:ff9b::/96`, the low 32 bits), 6to4 (`2002:AABB:CCDD::/48`, bits 16–48),
/// Teredo (`2001:0::/32`: the server in bits 32–64, the client inverted in the low 32 bits).
fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    let segments = ip.segments();
    let mut carried = Vec::new();
    // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated, SIIT)
    if bits >> 32 == 0xffff || bits >> 32 == 0xffff_0000 {
        carried.push(low32);
    }
    // 64:ff9b::/96
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        carried.push(low32);
    }
    if segments[0] == 0x2002 {
        carried.push(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    }
    if segments[0] == 0x2001 && segments[1] == 0 {
        carried.push(Ipv4Addr::from(((bits >> 64) & 0xffff_ffff) as u32));
        carried.push(Ipv4Addr::from(!(bits as u32)));
    }
    carried
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn blocks(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_built_in_list_parses() {
        assert_eq!(default_deny().len(), DEFAULT_DENY.len());
    }

    #[test]
    fn private_and_special_addresses_are_denied_by_default() {
        let policy = AddressPolicy::default();
        let denied = [
            // loopback, unspecified, "this network"
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "::1",
            "::",
            // RFC 1918
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            // CGNAT, link-local (cloud metadata), multicast, broadcast, reserved
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            // documentation and benchmarking
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "2001:db8::1",
            "2001:2::1",
            // IPv6 unique-local, link-local, site-local, multicast
            "fc00::1",
            "fd12:3456:789a::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            // IPv4-mapped and -compatible forms of private addresses
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            // IPv4-translated (SIIT)
            "::ffff:0:10.0.0.1",
            // NAT64 to private addresses, and the local-use NAT64 prefix
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::8.8.8.8",
            // 6to4 carrying private addresses (2002:0a00:0001:: = 10.0.0.1)
            "2002:a00:1::1",
            "2002:7f00:1::1",
            // Teredo with a private client (inverted 192.168.1.1 = 3f57:fefe) or server
            "2001:0:4136:e378:8000:63bf:3f57:fefe",
            "2001:0:a00:1::1",
        ];
        for text in denied {
            assert!(!policy.permits(ip(text)), "{text} must be denied");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let policy = AddressPolicy::default();
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:830::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            // Teredo: server 65.54.227.120, client inverted 8.8.8.8 = f7f7:f7f7
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        ];
        for text in public {
            assert!(policy.permits(ip(text)), "{text} must be allowed");
        }
    }

    #[test]
    fn the_allow_list_wins_over_every_deny() {
        let policy =
            AddressPolicy::from_config(&blocks(&["8.8.8.0/24"]), &blocks(&["127.0.0.0/8", "fd00::1"])).unwrap();
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("127.3.4.5")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")), "the mapped form of an allowed address");
        assert!(policy.permits(ip("64:ff9b::127.0.0.1")), "NAT64 of an allowed address");
        assert!(policy.permits(ip("fd00::1")), "a bare address is a /128");
        assert!(!policy.permits(ip("fd00::2")));
        assert!(!policy.permits(ip("10.0.0.1")), "the rest of the built-in list stays");
        assert!(!policy.permits(ip("::1")), "IPv6 loopback is not 127.0.0.0/8");
        assert!(!policy.permits(ip("8.8.8.8")), "extra deny blocks");
        assert!(!policy.permits(ip("::ffff:8.8.8.8")), "extra deny applies to the mapped form");
        assert!(!policy.permits(ip("2002:808:808::1")), "and to 6to4");
        assert!(policy.permits(ip("8.8.4.4")));
    }

    #[test]
    fn configuration_entries_are_checked() {
        assert!(AddressPolicy::from_config(&blocks(&["10.0.0.0/33"]), &[]).is_err());
        assert!(AddressPolicy::from_config(&[], &blocks(&["localhost"])).is_err());
        let err = AddressPolicy::from_config(&blocks(&["nonsense"]), &[]).unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
        // Host bits are dropped, as a CIDR block means the network.
        assert_eq!(parse_blocks(&blocks(&["10.1.2.3/8"])).unwrap(), vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    }
}
