//! Addresses in a policy: where an app listens ([`ListenAddr`]) and where
//! it may connect ([`ConnectTarget`]), with their one parser each (also
//! their `FromStr`), used by the validator and by the deserializers of the
//! corrald→zygote handoff.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where an app listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `host:port` or `[v6]:port`.
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
    /// `systemd:NAME`: the socket systemd passes with `FileDescriptorName=NAME`.
    Systemd(String),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// For the corrald→zygote handoff (see [`AppSpec`]): the string form, read
/// back with the policy's own parser.
impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_listen(&text).map_err(serde::de::Error::custom)
    }
}

/// One `network.connect` entry: an address or host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ConnectTarget {
    pub host: ConnectHost,
    pub port: u16,
}

/// The host part of a [`ConnectTarget`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectHost {
    Ip(IpAddr),
    /// A DNS name, lower-cased.
    Name(String),
    /// Any address and any port: `corral run --connect any` (a policy
    /// cannot say it; see [`ConnectTarget::any`]).
    Any,
}

impl ConnectTarget {
    /// Every address and port (`corral run --connect any`, what a runtime
    /// that inherits the host's network gives). Written `any`; the policy's
    /// `network.connect` refuses it (an app names where it connects).
    pub fn any() -> ConnectTarget {
        ConnectTarget {
            host: ConnectHost::Any,
            port: 0,
        }
    }

    /// Whether this entry allows every address and port.
    pub fn is_any(&self) -> bool {
        self.host == ConnectHost::Any
    }

    /// Whether a connection to `addr` (reached by the name `name`, if any)
    /// is allowed by this entry.
    pub fn allows(&self, addr: SocketAddr, name: Option<&str>) -> bool {
        if self.is_any() {
            return true;
        }
        if addr.port() != self.port {
            return false;
        }
        match &self.host {
            ConnectHost::Ip(ip) => *ip == addr.ip(),
            ConnectHost::Name(n) => name.is_some_and(|name| name.eq_ignore_ascii_case(n)),
            ConnectHost::Any => true,
        }
    }
}

impl fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            ConnectHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            ConnectHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            ConnectHost::Name(name) => write!(f, "{name}:{}", self.port),
            ConnectHost::Any => f.write_str("any"),
        }
    }
}

impl Serialize for ConnectTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// For the corrald→zygote handoff (see [`AppSpec`]); reads `any` back too.
impl<'de> Deserialize<'de> for ConnectTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "any" {
            return Ok(ConnectTarget::any());
        }
        parse_connect(&text).map_err(serde::de::Error::custom)
    }
}

/// Where a guest may bind and listen itself (TCP and UDP, through WASI
/// sockets): `corral run --listen`. Not a policy key: served apps get their
/// listening sockets from corrald (`listen`), never from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestListen {
    /// Any local address and port (`any`).
    Any,
    /// This address; port 0 means any port on it (the guest may bind port
    /// 0 and take the one the kernel picks, or name one).
    Addr(SocketAddr),
}

impl GuestListen {
    /// Whether binding or listening on `addr` is granted.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        match self {
            GuestListen::Any => true,
            GuestListen::Addr(grant) => {
                grant.ip() == addr.ip() && (grant.port() == 0 || grant.port() == addr.port())
            }
        }
    }

    /// The one TCP port this grant is held to, or `None` for any port.
    pub fn port(&self) -> Option<u16> {
        match self {
            GuestListen::Addr(a) if a.port() != 0 => Some(a.port()),
            _ => None,
        }
    }
}

impl fmt::Display for GuestListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestListen::Any => f.write_str("any"),
            GuestListen::Addr(a) => write!(f, "{a}"),
        }
    }
}

impl FromStr for GuestListen {
    type Err = String;

    /// `any`, `IP:PORT` or `[IPv6]:PORT` (port 0: any port on that address).
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "any" {
            return Ok(GuestListen::Any);
        }
        text.parse::<SocketAddr>()
            .map(GuestListen::Addr)
            .map_err(|_| {
                format!(
                    "`{text}` is not a listen grant: use \"IP:PORT\", \"[IPv6]:PORT\" (port 0: any port on that address) or \"any\""
                )
            })
    }
}

pub(crate) fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    let addr = if let Some(path) = text.strip_prefix("unix:") {
        ListenAddr::Unix(PathBuf::from(path))
    } else if let Some(name) = text.strip_prefix("systemd:") {
        ListenAddr::Systemd(name.to_string())
    } else {
        match text.parse::<SocketAddr>() {
            Ok(addr) => ListenAddr::Tcp(addr),
            Err(_) => {
                return Err(format!(
                    "`{text}` is not a listen address: use \"IP:PORT\", \"[IPv6]:PORT\", \"unix:/path\" or \"systemd:NAME\""
                ));
            }
        }
    };
    check_listen(&addr, text)?;
    Ok(addr)
}

/// What a listen address must be beyond its form (`written` is how it was
/// written, for the message): a named port, an absolute unix path, a
/// systemd name that can be a `FileDescriptorName=`.
pub(crate) fn check_listen(addr: &ListenAddr, written: &str) -> Result<(), String> {
    match addr {
        ListenAddr::Unix(path) if !path.is_absolute() => Err(format!(
            "`{written}`: a unix socket path must be absolute, e.g. \"unix:/run/app.sock\""
        )),
        ListenAddr::Systemd(name)
            if name.is_empty()
                || name.len() > 255
                || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') =>
        {
            Err(format!(
                "`{written}`: a systemd socket name is 1 to 255 printable characters without `:` (the unit's FileDescriptorName=)"
            ))
        }
        ListenAddr::Tcp(addr) if addr.port() == 0 => Err(format!(
            "`{written}`: port 0 is not allowed: name the port to listen on"
        )),
        _ => Ok(()),
    }
}

pub(crate) fn parse_connect(text: &str) -> Result<ConnectTarget, String> {
    let bad = || {
        format!(
            "`{text}` is not a connect target: use \"IP:PORT\", \"[IPv6]:PORT\" or \"HOSTNAME:PORT\""
        )
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("`{text}`: port 0 is not a port one can connect to"));
        }
        return Ok(ConnectTarget {
            host: ConnectHost::Ip(addr.ip()),
            port: addr.port(),
        });
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("`{text}`: port 0 is not a port one can connect to"));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(bad());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_name {
        return Err(bad());
    }
    Ok(ConnectTarget {
        host: ConnectHost::Name(host.to_ascii_lowercase()),
        port,
    })
}

impl FromStr for ListenAddr {
    type Err = String;

    /// As in a policy's `listen` (`IP:PORT`, `[IPv6]:PORT`, `unix:/path`,
    /// `systemd:NAME`); the error says what is wrong and what is allowed.
    fn from_str(text: &str) -> Result<Self, String> {
        parse_listen(text)
    }
}

impl FromStr for ConnectTarget {
    type Err = String;

    /// As in a policy's `network.connect` (`IP:PORT`, `[IPv6]:PORT`,
    /// `HOSTNAME:PORT`).
    fn from_str(text: &str) -> Result<Self, String> {
        parse_connect(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("127.0.0.1:8080").unwrap(),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            ListenAddr::Tcp("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_listen("unix:/run/a.sock").unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_listen("systemd:web").unwrap(),
            ListenAddr::Systemd("web".into())
        );
        for bad in [
            "localhost:80",
            "unix:rel.sock",
            "systemd:",
            "1.2.3.4:0",
            "1.2.3.4",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn connect_forms() {
        let t = parse_connect("127.0.0.1:5432").unwrap();
        assert!(t.allows("127.0.0.1:5432".parse().unwrap(), None));
        assert!(!t.allows("127.0.0.1:5433".parse().unwrap(), None));
        let t = parse_connect("DB.internal:443").unwrap();
        assert_eq!(t.to_string(), "db.internal:443");
        assert!(t.allows("10.0.0.1:443".parse().unwrap(), Some("db.internal")));
        assert!(!t.allows("10.0.0.1:443".parse().unwrap(), None));
        for bad in ["db", "db:x", ":80", "-a.b:1", "1.2.3.4:0"] {
            assert!(parse_connect(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn any_connects_anywhere_and_the_policy_refuses_it() {
        let any = ConnectTarget::any();
        assert!(any.allows("10.1.2.3:9".parse().unwrap(), None));
        assert!(any.allows("[::1]:443".parse().unwrap(), Some("x.example")));
        assert_eq!(any.to_string(), "any");
        let back: ConnectTarget = serde_json::from_str("\"any\"").unwrap();
        assert_eq!(back, any);
        assert!(parse_connect("any").is_err());
    }

    #[test]
    fn guest_listen_grants() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let exact: GuestListen = "127.0.0.1:8080".parse().unwrap();
        assert!(exact.allows(at("127.0.0.1:8080")));
        assert!(!exact.allows(at("127.0.0.1:8081")));
        assert!(!exact.allows(at("0.0.0.0:8080")));
        assert_eq!(exact.port(), Some(8080));
        let any_port: GuestListen = "[::1]:0".parse().unwrap();
        assert!(any_port.allows(at("[::1]:41000")));
        assert!(!any_port.allows(at("127.0.0.1:41000")));
        assert_eq!(any_port.port(), None);
        let any: GuestListen = "any".parse().unwrap();
        assert!(any.allows(at("0.0.0.0:1")) && any.port().is_none());
        let err = "localhost:80".parse::<GuestListen>().unwrap_err();
        assert!(err.contains("not a listen grant"), "{err}");
    }
}
