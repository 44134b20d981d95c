//! Which IP addresses the proxy refuses to connect to, and networks written as CIDR.
//!
//! An allowed host name must not become a way into the host's own network: an address that
//! is loopback, private, link-local (the cloud metadata service at 169.254.169.254),
//! carrier-grade NAT, multicast, unspecified, broadcast or reserved has a [`Restriction`],
//! and the proxy refuses it unless an `--allow-net` [`IpNet`] covers it. The invariant: an
//! IPv6 address that carries an IPv4 address (`::ffff:127.0.0.1`, NAT64 `64:ff9b::/96`) is
//! judged as that IPv4 address, so no spelling slips past. Documentation ranges such as
//! 203.0.113.0/24 are ordinary public addresses here: package registries resolve into them
//! on our machines.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why an address is refused unless an allowed network covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7, fec0::/10.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 100.64.0.0/10, shared by carrier-grade NAT.
    SharedAddressSpace,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8, `::`.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 240.0.0.0/4.
    Reserved,
}

impl fmt::Display for Restriction {
    /// Reads after "address 10.0.0.1 is ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Restriction::Loopback => "loopback",
            Restriction::Private => "private",
            Restriction::LinkLocal => "link-local",
            Restriction::SharedAddressSpace => "in the carrier-grade NAT range",
            Restriction::Multicast => "multicast",
            Restriction::Unspecified => "unspecified",
            Restriction::Broadcast => "broadcast",
            Restriction::Reserved => "reserved",
        })
    }
}

/// Why the proxy would refuse `addr`, or `None` for an ordinary public address.
pub fn restriction(addr: IpAddr) -> Option<Restriction> {
    match canonical(addr) {
        IpAddr::V4(v4) => restriction_v4(v4),
        IpAddr::V6(v6) => restriction_v6(v6),
    }
}

/// `addr`, or the IPv4 address an IPv6 address carries (IPv4-mapped or NAT64).
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    const NAT64_PREFIX: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = v6.to_bits();
    // The low 32 bits are the IPv4 address; truncation is the point.
    (v6.segments()[..6] == NAT64_PREFIX).then(|| Ipv4Addr::from_bits(bits as u32))
}

fn restriction_v4(addr: Ipv4Addr) -> Option<Restriction> {
    let [first, second, ..] = addr.octets();
    if first == 0 {
        Some(Restriction::Unspecified)
    } else if addr.is_loopback() {
        Some(Restriction::Loopback)
    } else if addr.is_private() {
        Some(Restriction::Private)
    } else if addr.is_link_local() {
        Some(Restriction::LinkLocal)
    } else if first == 100 && (second & 0xc0) == 64 {
        Some(Restriction::SharedAddressSpace)
    } else if addr.is_multicast() {
        Some(Restriction::Multicast)
    } else if addr.is_broadcast() {
        Some(Restriction::Broadcast)
    } else if first >= 240 {
        Some(Restriction::Reserved)
    } else {
        None
    }
}

fn restriction_v6(addr: Ipv6Addr) -> Option<Restriction> {
    let first = addr.segments()[0];
    if addr.is_unspecified() {
        Some(Restriction::Unspecified)
    } else if addr.is_loopback() {
        Some(Restriction::Loopback)
    } else if addr.is_multicast() {
        Some(Restriction::Multicast)
    } else if (first & 0xffc0) == 0xfe80 {
        Some(Restriction::LinkLocal)
    } else if (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfec0 {
        // Unique local, and the deprecated site-local range.
        Some(Restriction::Private)
    } else {
        None
    }
}

/// A network in CIDR notation, `127.0.0.0/8` or `fd00::/8`; a bare address is a network of
/// one. Host bits past the prefix are rejected rather than guessed away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `addr` (in any spelling, see [`canonical`]) lies in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = mask_v4(self.prefix);
                net.to_bits() & mask == addr.to_bits() & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = mask_v6(self.prefix);
                net.to_bits() & mask == addr.to_bits() & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = NetError;

    fn from_str(raw: &str) -> Result<Self, NetError> {
        let invalid = |problem| NetError {
            net: raw.to_string(),
            problem,
        };
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid(NetProblem::Address))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: u8's parser would also take `+8`.
            Some(digits) => match digits.parse::<u8>() {
                Ok(prefix) if prefix <= max && digits.bytes().all(|b| b.is_ascii_digit()) => prefix,
                _ => return Err(invalid(NetProblem::Prefix { max })),
            },
        };
        let net = IpNet { addr, prefix };
        let network = IpNet {
            addr: network_address(addr, prefix),
            prefix,
        };
        if network != net {
            return Err(invalid(NetProblem::HostBits { network }));
        }
        Ok(net)
    }
}

fn network_address(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask_v4(prefix))),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask_v6(prefix))),
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// An invalid network: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid network {net:?}: {problem}; a network is an IP address with a prefix length, \
     like 127.0.0.0/8 or fd00::/8, or a single address"
)]
pub struct NetError {
    /// The network as given.
    pub net: String,
    /// What is wrong with it.
    pub problem: NetProblem,
}

/// What is wrong with a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetProblem {
    /// The part before `/` is not an IP address.
    #[error("it does not start with an IP address")]
    Address,
    /// The part after `/` is not a number up to 32 (IPv4) or 128 (IPv6).
    #[error("the prefix length is not a number from 0 to {max}")]
    Prefix {
        /// 32 or 128.
        max: u8,
    },
    /// Bits are set past the prefix, which usually means a typo.
    #[error("it has bits set past the prefix length; did you mean {network}?")]
    HostBits {
        /// The network the address lies in.
        network: IpNet,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(addr: &str) -> Option<Restriction> {
        restriction(addr.parse().expect(addr))
    }

    fn net(raw: &str) -> IpNet {
        raw.parse().expect(raw)
    }

    #[test]
    fn public_addresses_have_no_restriction() {
        for addr in [
            "203.0.113.5", // documentation range: the package registries resolve here
            "198.51.100.1",
            "192.0.2.1",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "100.63.255.255",
            "169.253.0.1",
            "2001:db8::1",
            "2a00:1450::1",
            "::ffff:203.0.113.5",
        ] {
            assert_eq!(of(addr), None, "{addr}");
        }
    }

    #[test]
    fn internal_ipv4_addresses_are_restricted() {
        use Restriction::*;
        for (addr, expected) in [
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("169.254.169.254", LinkLocal),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
        ] {
            assert_eq!(of(addr), Some(expected), "{addr}");
        }
    }

    #[test]
    fn internal_ipv6_addresses_are_restricted_in_every_spelling() {
        use Restriction::*;
        for (addr, expected) in [
            ("::1", Loopback),
            ("::", Unspecified),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("fe80::1", LinkLocal),
            ("ff02::1", Multicast),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:10.0.0.1", Private),
            ("64:ff9b::7f00:1", Loopback),
        ] {
            assert_eq!(of(addr), Some(expected), "{addr}");
        }
    }

    #[test]
    fn restriction_reads_in_a_sentence() {
        let reason = format!("address 127.0.0.1 is {}", Restriction::Loopback);
        assert_eq!(reason, "address 127.0.0.1 is loopback");
    }

    #[test]
    fn network_contains_its_addresses_in_any_spelling() {
        let loopback = net("127.0.0.0/8");
        assert!(loopback.contains("127.0.0.1".parse().expect("addr")));
        assert!(loopback.contains("127.200.1.1".parse().expect("addr")));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().expect("addr")));
        assert!(!loopback.contains("128.0.0.1".parse().expect("addr")));
        assert!(!loopback.contains("::1".parse().expect("addr")));
        assert!(net("::1").contains("::1".parse().expect("addr")));
        assert!(net("0.0.0.0/0").contains("10.0.0.1".parse().expect("addr")));
        assert!(net("fc00::/7").contains("fd00::5".parse().expect("addr")));
        assert!(!net("10.0.0.1").contains("10.0.0.2".parse().expect("addr")));
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn invalid_networks_say_what_is_wrong() {
        let problem = |raw: &str| raw.parse::<IpNet>().expect_err(raw).problem;
        assert_eq!(problem("localhost/8"), NetProblem::Address);
        assert_eq!(problem(""), NetProblem::Address);
        assert_eq!(problem("10.0.0.0/33"), NetProblem::Prefix { max: 32 });
        assert_eq!(problem("10.0.0.0/"), NetProblem::Prefix { max: 32 });
        assert_eq!(problem("10.0.0.0/+8"), NetProblem::Prefix { max: 32 });
        assert_eq!(problem("::/129"), NetProblem::Prefix { max: 128 });
        assert_eq!(
            problem("10.0.0.1/8"),
            NetProblem::HostBits {
                network: net("10.0.0.0/8")
            }
        );
        let message = "10.0.0.1/8"
            .parse::<IpNet>()
            .expect_err("host bits")
            .to_string();
        assert!(message.contains("\"10.0.0.1/8\""), "{message}");
        assert!(message.contains("did you mean 10.0.0.0/8?"), "{message}");
    }
}
