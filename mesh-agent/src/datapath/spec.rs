//! Typed description of what the data path should do for one service, as the agent's model
//! gives it; translated into map entries by `Datapath::apply_service`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_common::{PROTO_TCP, PROTO_UDP, service};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

/// Load-balancing algorithm, chosen per service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    #[default]
    Random,
    RoundRobin,
    Weighted,
    Maglev,
    LeastConn,
}

impl Algorithm {
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::Random => service::LB_RANDOM,
            Self::RoundRobin => service::LB_ROUND_ROBIN,
            Self::Weighted => service::LB_WEIGHTED,
            Self::Maglev => service::LB_MAGLEV,
            Self::LeastConn => service::LB_LEAST_CONN,
        }
    }

    /// Whether the kernel needs a lookup table for this algorithm.
    #[must_use]
    pub fn uses_table(self) -> bool {
        matches!(self, Self::Weighted | Self::Maglev)
    }
}

/// Circuit-breaker and outlier-detection settings (Envoy's names and defaults where they exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitSettings {
    /// Per backend; 0 = unlimited. Istio's `connectionPool.tcp.maxConnections` is unlimited
    /// unless a policy sets it (Envoy's bare default, 1024, would throttle a healthy cluster).
    pub max_connections: u32,
    /// 0 disables ejection. Envoy: `outlier_detection.consecutive_gateway_failure` (5).
    pub consecutive_failures: u32,
    /// Envoy: `base_ejection_time` (30 s).
    pub base_ejection: Duration,
    /// Envoy: `max_ejection_time` (300 s).
    pub max_ejection: Duration,
    /// Envoy: `max_ejection_percent` (10).
    pub max_ejection_percent: u32,
    /// Envoy: `common_lb_config.healthy_panic_threshold` (50 %). When fewer than this share of a
    /// service's endpoints are eligible, balance over all of them, ejected or not; 0 = never
    /// panic, so a service whose every endpoint is ejected fails fast.
    pub panic_threshold_percent: u32,
}

/// Default `max_connections` per backend: unlimited (Istio's default).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 0;
/// Default consecutive failures before ejection (Envoy's).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default base ejection time (Envoy's).
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Default cap of one ejection (Envoy's).
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_mins(5);
/// Default maximum share of ejected backends (Envoy's).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Default panic threshold (Envoy's `healthy_panic_threshold`).
pub const DEFAULT_PANIC_THRESHOLD_PERCENT: u32 = 50;

impl Default for CircuitSettings {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            panic_threshold_percent: DEFAULT_PANIC_THRESHOLD_PERCENT,
        }
    }
}

/// An endpoint's address and port in 20 bytes. A `SocketAddr` takes 32 (an IPv6 one carries a
/// flow label and a scope id, which no service endpoint has: Kubernetes `EndpointSlices` and the
/// file source give address and port only, as kube-proxy and Envoy take them); a large cluster
/// holds one a backend (issue 8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointAddr {
    ip: IpAddr,
    port: u16,
}

impl EndpointAddr {
    #[must_use]
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self { ip, port }
    }

    #[must_use]
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    #[must_use]
    pub fn is_ipv4(&self) -> bool {
        self.ip.is_ipv4()
    }

    #[must_use]
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// Drops an IPv6 address's flow label and scope id (see [`EndpointAddr`]).
impl From<SocketAddr> for EndpointAddr {
    fn from(a: SocketAddr) -> Self {
        Self::new(a.ip(), a.port())
    }
}

impl From<EndpointAddr> for SocketAddr {
    fn from(a: EndpointAddr) -> Self {
        a.socket_addr()
    }
}

impl PartialEq<SocketAddr> for EndpointAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        self.socket_addr() == *other
    }
}

/// As a `SocketAddr` prints (`10.0.0.1:80`, `[fd00::1]:80`).
impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.socket_addr(), f)
    }
}

impl fmt::Debug for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One endpoint of a service: 24 bytes (36 with a `SocketAddr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: EndpointAddr,
    /// Relative weight for [`Algorithm::Weighted`]; ignored otherwise. Must be ≥ 1.
    pub weight: u32,
}

impl BackendSpec {
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr: addr.into(),
            weight: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of [`EndpointAddr`]: a backend in 24 bytes, not 36.
    #[test]
    fn backend_spec_is_24_bytes() {
        assert_eq!(size_of::<EndpointAddr>(), 20);
        assert_eq!(size_of::<BackendSpec>(), 24);
    }

    #[test]
    fn endpoint_addr_prints_and_compares_as_a_socket_addr() {
        for s in ["10.0.0.1:80", "[fd00::1]:8080"] {
            let sa: SocketAddr = s.parse().unwrap();
            let a = EndpointAddr::from(sa);
            assert_eq!(a.to_string(), s);
            assert_eq!(format!("{a:?}"), s);
            assert_eq!(a, sa);
            assert_eq!(SocketAddr::from(a), sa);
        }
    }
}

/// Everything the kernel needs to balance one service address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// `ClientIP` affinity (per client pod) with this idle timeout.
    pub affinity_timeout: Option<Duration>,
    pub circuit: CircuitSettings,
    /// Entries of the Maglev/weighted lookup table (a prime, 1,021..=131,071); `None` = the
    /// data path chooses one from the endpoint count. Ignored by the other algorithms.
    pub table_size: Option<u32>,
    pub backends: Vec<BackendSpec>,
}

impl ServiceSpec {
    /// A TCP service with default settings.
    #[must_use]
    pub fn tcp(vip: SocketAddr, backends: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            vip,
            protocol: Protocol::Tcp,
            algorithm: Algorithm::default(),
            affinity_timeout: None,
            circuit: CircuitSettings::default(),
            table_size: None,
            backends: backends.into_iter().map(BackendSpec::new).collect(),
        }
    }
}
