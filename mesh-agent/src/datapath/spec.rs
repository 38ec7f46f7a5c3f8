//! Typed description of what the data path should do for one service, as the agent's model
//! gives it; translated into map entries by `Datapath::apply_service`.

use std::{net::SocketAddr, time::Duration};

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

/// One endpoint of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// Relative weight for [`Algorithm::Weighted`]; ignored otherwise. Must be ≥ 1.
    pub weight: u32,
}

impl BackendSpec {
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, weight: 1 }
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
