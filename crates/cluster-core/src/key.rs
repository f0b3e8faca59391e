//! Handle keys: which listen requests share one socket in the primary.

use std::fmt;

use crate::wire::{ListenFlags, ListenRequest, ListenTarget, SocketKind};

/// The address family and socket type of a handle, as Node's `addressType` (`4`, `6`, `-1`,
/// `udp4`, `udp6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressType {
    /// A listener on an inherited fd; its family is whatever the fd is. The kind is part of it,
    /// so a request for the fd as the other kind never joins the handle.
    Fd(SocketKind),
    /// A socket the service manager passed under a name; like an fd, its family is whatever
    /// the socket is.
    Named(SocketKind),
    /// TCP over IPv4.
    Tcp4,
    /// TCP over IPv6.
    Tcp6,
    /// UDP over IPv4.
    Udp4,
    /// UDP over IPv6.
    Udp6,
    /// A Unix stream socket (Node's "pipe").
    Unix,
}

impl AddressType {
    /// The type of a request; `None` for a combination that cannot exist (a datagram Unix path).
    pub fn of(request: &ListenRequest) -> Option<Self> {
        Some(match (&request.target, request.kind) {
            (ListenTarget::Fd(_), kind) => Self::Fd(kind),
            (ListenTarget::Name(_), kind) => Self::Named(kind),
            (ListenTarget::Ip(a), SocketKind::Stream) if a.is_ipv4() => Self::Tcp4,
            (ListenTarget::Ip(_), SocketKind::Stream) => Self::Tcp6,
            (ListenTarget::Ip(a), SocketKind::Datagram) if a.is_ipv4() => Self::Udp4,
            (ListenTarget::Ip(_), SocketKind::Datagram) => Self::Udp6,
            (ListenTarget::Path(_), SocketKind::Stream) => Self::Unix,
            (ListenTarget::Path(_), SocketKind::Datagram) => return None,
        })
    }

    /// Whether this is a datagram socket (always shared, never round-robin).
    pub fn is_datagram(self) -> bool {
        matches!(
            self,
            Self::Udp4
                | Self::Udp6
                | Self::Fd(SocketKind::Datagram)
                | Self::Named(SocketKind::Datagram)
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Fd(SocketKind::Stream) => "fd",
            Self::Fd(SocketKind::Datagram) => "fd-dgram",
            Self::Named(SocketKind::Stream) => "name",
            Self::Named(SocketKind::Datagram) => "name-dgram",
            Self::Tcp4 => "4",
            Self::Tcp6 => "6",
            Self::Udp4 => "udp4",
            Self::Udp6 => "udp6",
            Self::Unix => "-1",
        }
    }
}

/// Identifies one shared socket in the primary, after Node's `address:port:addressType:fd:index`.
///
/// As in Node since 2026 (PR #60141), the per-worker `index` is part of the key only for port 0:
/// a worker's second `bind(":0")` gets a second ephemeral port (shared, at that ordinal, by every
/// worker), while a second bind of the same fixed port by the same worker is a clean
/// `EADDRINUSE`. Socket flags (`ipv6_only`, `reuse_addr`) are part of the key, so `::` with and
/// without `ipv6_only` are different sockets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleKey {
    target: ListenTarget,
    address_type: AddressType,
    flags: ListenFlags,
    index: Option<u32>,
}

impl HandleKey {
    /// The key of `request` at `index` (ignored unless the request is for an IP port 0).
    ///
    /// `None` for a request that cannot be served at all (see [`AddressType::of`]).
    pub fn new(request: &ListenRequest, index: u32) -> Option<Self> {
        let address_type = AddressType::of(request)?;
        let index = matches!(request.target, ListenTarget::Ip(a) if a.port() == 0).then_some(index);
        Some(Self {
            target: request.target.clone(),
            address_type,
            flags: request.flags,
            index,
        })
    }

    /// Whether keys of this request depend on the per-worker index (IP port 0).
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
    }

    /// The per-worker ordinal, for port-0 keys.
    pub fn index(&self) -> Option<u32> {
        self.index
    }

    /// The socket type.
    pub fn address_type(&self) -> AddressType {
        self.address_type
    }

    /// What the key listens on.
    pub fn target(&self) -> &ListenTarget {
        &self.target
    }
}

impl fmt::Display for HandleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            ListenTarget::Ip(a) => write!(
                f,
                "{}:{}:{}:-",
                a.ip(),
                a.port(),
                self.address_type.as_str()
            )?,
            ListenTarget::Path(p) => write!(f, "{}:-1:-1:-", String::from_utf8_lossy(p))?,
            ListenTarget::Fd(fd) => write!(f, "-:-:fd:{fd}")?,
            ListenTarget::Name(name) => write!(f, "-:-:{}:{name}", self.address_type.as_str())?,
        }
        if let Some(index) = self.index {
            write!(f, ":{index}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str) -> ListenRequest {
        ListenRequest {
            target: ListenTarget::Ip(addr.parse().unwrap()),
            kind: SocketKind::Stream,
            backlog: 0,
            flags: ListenFlags::default(),
        }
    }

    #[test]
    fn port_zero_keys_carry_the_index_fixed_ports_do_not() {
        let zero = tcp("127.0.0.1:0");
        assert_ne!(HandleKey::new(&zero, 0), HandleKey::new(&zero, 1));
        assert_eq!(
            HandleKey::new(&zero, 1).unwrap().to_string(),
            "127.0.0.1:0:4:-:1"
        );
        let fixed = tcp("[::1]:3000");
        assert_eq!(HandleKey::new(&fixed, 0), HandleKey::new(&fixed, 7));
        assert_eq!(
            HandleKey::new(&fixed, 3).unwrap().to_string(),
            "::1:3000:6:-"
        );
    }

    #[test]
    fn flags_and_kind_separate_keys() {
        let mut v6only = tcp("[::]:80");
        v6only.flags.ipv6_only = true;
        assert_ne!(
            HandleKey::new(&v6only, 0),
            HandleKey::new(&tcp("[::]:80"), 0)
        );
        let mut udp = tcp("0.0.0.0:53");
        udp.kind = SocketKind::Datagram;
        let key = HandleKey::new(&udp, 0).unwrap();
        assert!(key.address_type().is_datagram());
        assert_ne!(Some(key), HandleKey::new(&tcp("0.0.0.0:53"), 0));
    }

    #[test]
    fn unix_datagram_is_not_servable() {
        let request = ListenRequest {
            target: ListenTarget::Path(b"/tmp/x.sock".to_vec()),
            kind: SocketKind::Datagram,
            backlog: 0,
            flags: ListenFlags::default(),
        };
        assert_eq!(HandleKey::new(&request, 0), None);
        let stream = ListenRequest {
            kind: SocketKind::Stream,
            ..request
        };
        assert_eq!(
            HandleKey::new(&stream, 0).unwrap().to_string(),
            "/tmp/x.sock:-1:-1:-"
        );
    }
}
