//! Which address a request comes from, and which bucket it is rate-limited in.
//!
//! Behind a reverse proxy the peer is the proxy; the client is in `X-Forwarded-For`. Each proxy
//! appends the address it received the request from, so only the hops appended by proxies we
//! trust are true: the client may have sent any list of its own before them. The client is the
//! right-most hop that is not one of our trusted proxies.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// An address block in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNetwork {
    address: IpAddr,
    prefix_len: u8,
}

impl IpNetwork {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), 32, self.prefix_len)
                    == masked(u128::from(u32::from(ip)), 32, self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.prefix_len) == masked(u128::from(ip), 128, self.prefix_len)
            }
            _ => false,
        }
    }
}

/// The top `prefix_len` bits of a `width`-bit address.
fn masked(bits: u128, width: u8, prefix_len: u8) -> u128 {
    if prefix_len == 0 { 0 } else { bits >> (width - prefix_len) }
}

impl FromStr for IpNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix_len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (text, None),
        };
        let address: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let address = address.to_canonical();
        let width = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_len {
            Some(len) => len
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= width)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0–{width}"))?,
            None => width,
        };
        Ok(Self { address, prefix_len })
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// The client's address: the peer unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` hop that is not a trusted proxy (or the left-most hop, when every
/// hop is one). Unparseable hops end the walk: nothing left of them can be trusted.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted_proxies: &[IpNetwork]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    let Some(header) = forwarded_for else { return peer };
    let mut client = peer;
    for hop in header.rsplit(',') {
        if !is_trusted(client) {
            break;
        }
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => client = ip.to_canonical(),
            Err(_) => break,
        }
    }
    client
}

/// The rate-limit bucket of an address: IPv4 clients one each, IPv6 clients one per /64, since
/// one subscriber usually holds a whole /64 and can pick any address in it.
pub fn rate_limit_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64));
            format!("{network}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let local = nets(&["127.0.0.0/8", "::1", "10.1.0.0/16", "2001:db8::/32", "0.0.0.0/0"]);
        assert!(local[0].contains(ip("127.9.9.9")));
        assert!(!local[0].contains(ip("128.0.0.1")));
        assert!(local[1].contains(ip("::1")));
        assert!(!local[1].contains(ip("::2")));
        assert!(local[2].contains(ip("::ffff:10.1.2.3")), "IPv4-mapped addresses count as IPv4");
        assert!(local[3].contains(ip("2001:db8:ffff::1")));
        assert!(!local[3].contains(ip("2001:db9::1")));
        assert!(local[4].contains(ip("203.0.113.1")));
        assert!(!local[4].contains(ip("::1")), "an IPv4 block never holds an IPv6 address");
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0.0/-1", "example.com", "10.0.0.0/x"] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_forged_first_hop_is_not_the_client() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let proxy = ip("127.0.0.1");
        // The client sent "6.6.6.6" itself; the proxy appended the address it saw.
        assert_eq!(client_address(proxy, Some("6.6.6.6, 203.0.113.7"), &trusted), ip("203.0.113.7"));
        // Two trusted proxies in a row are skipped.
        assert_eq!(client_address(proxy, Some("6.6.6.6, 203.0.113.7, 10.0.0.2"), &trusted), ip("203.0.113.7"));
        // Every hop trusted: the left-most one is as far as we can see.
        assert_eq!(client_address(proxy, Some("10.0.0.3, 10.0.0.2"), &trusted), ip("10.0.0.3"));
        // Garbage stops the walk at the last trusted hop before it.
        assert_eq!(client_address(proxy, Some("203.0.113.7, junk, 10.0.0.2"), &trusted), ip("10.0.0.2"));
        assert_eq!(client_address(proxy, None, &trusted), proxy);
    }

    #[test]
    fn an_untrusted_peer_cannot_forward_anything() {
        let trusted = nets(&["127.0.0.1/32"]);
        let peer = ip("198.51.100.9");
        assert_eq!(client_address(peer, Some("203.0.113.7"), &trusted), peer);
        assert_eq!(client_address(ip("127.0.0.1"), Some("198.51.100.9"), &[]), ip("127.0.0.1"));
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        assert_eq!(rate_limit_key(ip("2001:db8:1:2::1")), rate_limit_key(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(rate_limit_key(ip("2001:db8:1:2::1")), rate_limit_key(ip("2001:db8:1:3::1")));
        assert_eq!(rate_limit_key(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(rate_limit_key(ip("192.0.2.1")), "192.0.2.1");
        assert_ne!(rate_limit_key(ip("192.0.2.1")), rate_limit_key(ip("192.0.2.2")));
        assert_eq!(rate_limit_key(ip("::ffff:192.0.2.1")), "192.0.2.1");
    }
}
