//! Backends of the gateway: Service ports resolved to endpoints from the agent's own cluster
//! model (the same discovery sources and kube-proxy rules, via `ClusterModel::desired_specs`),
//! chosen with the kernel's algorithms, with passive outlier detection in the gateway and two
//! hooks to the node's kernel circuits (read the ejections, report L7 outcomes).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use super::config::ServiceRef;
use crate::{
    datapath::spec::{Algorithm, CircuitSettings},
    model::{ClusterModel, ObjectName},
};

/// Live state of one endpoint, kept across model updates (matched by address).
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once (the backend request's URI and `:authority`).
    pub authority: http::uri::Authority,
    /// The pod behind the address, when the model names it (`destination_workload` of the
    /// request metrics).
    pub pod: Option<Arc<ObjectName>>,
    /// Requests in flight (least-request).
    pub active: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl EndpointState {
    fn new(addr: SocketAddr, pod: Option<Arc<ObjectName>>) -> Self {
        // A socket address always formats as a valid authority (`ip:port`, `[ip6]:port`).
        let authority =
            http::uri::Authority::from_maybe_shared(bytes::Bytes::from(addr.to_string()))
                .unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
        Self {
            addr,
            authority,
            pod,
            active: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }
}

/// The endpoints of one Service port and how to choose among them.
#[derive(Debug)]
pub struct ServiceBackends {
    pub name: ObjectName,
    /// The same name, shared with the request metrics' keys (`destination_service`).
    pub label: Arc<ObjectName>,
    /// The Service's cluster IPs with this port (one per family): the kernel's service keys,
    /// which L7 reports to the node agent name.
    pub vips: Vec<SocketAddr>,
    pub algorithm: Algorithm,
    pub circuit: CircuitSettings,
    pub endpoints: Vec<Arc<EndpointState>>,
    rr: AtomicUsize,
    /// Shared by every Service of the snapshot (an endpoint may serve two): the latest
    /// `ejected_until_ms` any local ejection set, or 0 once `pick` saw them all over (it then
    /// reads no clock). Past it nothing is ejected locally, and `pick` skips the per-endpoint
    /// checks.
    ejected_until_max: Arc<AtomicU64>,
}

/// Why no endpoint was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The Service has no usable endpoint (or is unknown).
    Empty,
    /// Every endpoint is ejected (by the gateway or the kernel).
    AllEjected,
}

/// Reads the node's kernel circuits: whether an endpoint is ejected there. The gateway runs as
/// its own Deployment, usually without the node's bpffs pins; [`NoKernelCircuits`] says so.
pub trait CircuitView: Send + Sync + std::fmt::Debug {
    fn is_open(&self, addr: SocketAddr) -> bool;
    /// Whether any endpoint's circuit is open (when not, `is_open` is false for every one).
    fn any_open(&self) -> bool {
        true
    }
    /// What this view reads (logged at start).
    fn describe(&self) -> &'static str;
}

/// No kernel view: the gateway's own outlier detection alone.
#[derive(Debug)]
pub struct NoKernelCircuits;

impl CircuitView for NoKernelCircuits {
    fn is_open(&self, _: SocketAddr) -> bool {
        false
    }
    fn any_open(&self) -> bool {
        false
    }
    fn describe(&self) -> &'static str {
        "kernel circuits not readable from the gateway process (no pinned maps): gateway-local outlier detection only"
    }
}

/// Where the gateway's L7 outcomes go so the kernel's circuits count them: the node agent's
/// data-path owner through its admin API (`super::kernel::AdminFeedback`, `--agent-socket`),
/// or only the log ([`LogFeedback`]) when the gateway has no agent beside it.
pub trait HealthFeedback: Send + Sync + std::fmt::Debug {
    fn failure(&self, service: &ServiceBackends, addr: SocketAddr, why: &str);
    fn success(&self, service: &ServiceBackends, addr: SocketAddr);
}

/// Logs failures at debug level.
#[derive(Debug)]
pub struct LogFeedback;

impl HealthFeedback for LogFeedback {
    fn failure(&self, service: &ServiceBackends, addr: SocketAddr, why: &str) {
        tracing::debug!(service = %service.name, %addr, why, "L7 failure");
    }
    fn success(&self, _: &ServiceBackends, _: SocketAddr) {}
}

/// Every Service port the routes name, looked up once per request: hashed with foldhash (the
/// keys come from the configuration, not from clients), not the std `RandomState`'s `SipHash`.
pub type ServiceMap = HashMap<ServiceRef, Arc<ServiceBackends>, foldhash::fast::RandomState>;

/// The snapshot the proxy reads: every Service port the routes name.
#[derive(Debug, Default)]
pub struct Backends {
    pub services: ServiceMap,
    /// See `ServiceBackends::ejected_until_max`; carried from one snapshot to the next with the
    /// endpoints' states.
    ejected_until_max: Arc<AtomicU64>,
}

impl Backends {
    /// Resolves `wanted` from `model`, keeping the live state of endpoints `previous` had.
    #[must_use]
    pub fn build(model: &ClusterModel, wanted: &BTreeSet<ServiceRef>, previous: &Self) -> Self {
        let mut old: HashMap<SocketAddr, Arc<EndpointState>> = HashMap::new();
        for s in previous.services.values() {
            for e in &s.endpoints {
                old.insert(e.addr, e.clone());
            }
        }
        // Endpoint address → its pod (the metrics' destination workload).
        let mut pods: HashMap<std::net::IpAddr, Arc<ObjectName>> = HashMap::new();
        for p in model.pods.values() {
            let name = Arc::new(p.name.clone());
            for ip in &p.ips {
                pods.insert(*ip, name.clone());
            }
        }
        for s in model.services.values() {
            for e in &s.endpoints {
                if let Some(p) = &e.pod {
                    pods.entry(e.ip).or_insert_with(|| Arc::new(p.clone()));
                }
            }
        }
        let mut services = HashMap::new();
        // desired_specs applies kube-proxy's endpoint rules (readiness, terminating
        // fallback, topology, internalTrafficPolicy) per cluster IP and port.
        for (name, spec) in model.desired_specs() {
            let key = ServiceRef {
                service: name.clone(),
                port: spec.vip.port(),
            };
            if !wanted.contains(&key) {
                continue;
            }
            let entry = services.entry(key).or_insert_with(|| ServiceBackends {
                name: name.clone(),
                label: Arc::new(name.clone()),
                vips: Vec::new(),
                algorithm: spec.algorithm,
                circuit: spec.circuit,
                endpoints: Vec::new(),
                rr: AtomicUsize::new(0),
                ejected_until_max: previous.ejected_until_max.clone(),
            });
            if !entry.vips.contains(&spec.vip) {
                entry.vips.push(spec.vip);
            }
            for b in &spec.backends {
                let addr = b.addr.socket_addr();
                if entry.endpoints.iter().any(|e| e.addr == addr) {
                    continue;
                }
                let pod = pods.get(&addr.ip()).cloned();
                // A new pod at an old address is a new backend: its own failure history.
                let state = old
                    .get(&addr)
                    .filter(|o| o.pod == pod)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointState::new(addr, pod)));
                entry.endpoints.push(state);
            }
        }
        Self {
            services: services
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            ejected_until_max: previous.ejected_until_max.clone(),
        }
    }
}

/// Milliseconds since `epoch`, never 0 (0 means "not ejected").
fn now_ms(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl ServiceBackends {
    /// The cluster IP (with this port) of `backend`'s address family.
    #[must_use]
    pub fn vip_for(&self, backend: SocketAddr) -> Option<SocketAddr> {
        self.vips
            .iter()
            .copied()
            .find(|v| v.is_ipv4() == backend.is_ipv4())
    }

    fn ejected(e: &EndpointState, now: u64, kernel: &dyn CircuitView) -> bool {
        e.ejected_until_ms.load(Ordering::Relaxed) > now || kernel.is_open(e.addr)
    }

    /// Chooses an endpoint with the service's algorithm, skipping `exclude` (the endpoint a
    /// retry just failed on) when another is eligible. Like the kernel (and Envoy's
    /// `healthy_panic_threshold`), when fewer than the panic threshold share of endpoints are
    /// eligible it balances over all of them; threshold 0: fail at once.
    pub fn pick(
        &self,
        exclude: Option<SocketAddr>,
        epoch: Instant,
        kernel: &dyn CircuitView,
    ) -> Result<Arc<EndpointState>, NoEndpoint> {
        if self.endpoints.is_empty() {
            return Err(NoEndpoint::Empty);
        }
        if exclude.is_none() && !kernel.any_open() {
            // 0: no local ejection is ahead, and no clock read is needed to know it.
            let max = self.ejected_until_max.load(Ordering::Relaxed);
            if max == 0 || max <= now_ms(epoch, Instant::now()) {
                if max != 0 {
                    // Every local ejection is over: back to 0, so later picks skip the clock.
                    // An ejection stored meanwhile raised the value and this fails.
                    let _ = self.ejected_until_max.compare_exchange(
                        max,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                // Nothing ejected anywhere: every endpoint is eligible, no list to build.
                return Ok(self
                    .choose(self.endpoints.len(), |i| &self.endpoints[i])
                    .clone());
            }
        }
        let now = now_ms(epoch, Instant::now());
        let healthy: Vec<&Arc<EndpointState>> = self
            .endpoints
            .iter()
            .filter(|e| !Self::ejected(e, now, kernel))
            .collect();
        let panic = (healthy.len() * 100)
            < self.endpoints.len() * self.circuit.panic_threshold_percent as usize;
        let pool: Vec<&Arc<EndpointState>> = if panic {
            self.endpoints.iter().collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return Err(NoEndpoint::AllEjected);
        }
        let candidates: Vec<&Arc<EndpointState>> = match exclude {
            Some(x) if pool.len() > 1 => pool.iter().copied().filter(|e| e.addr != x).collect(),
            _ => pool,
        };
        Ok(self.choose(candidates.len(), |i| candidates[i]).clone())
    }

    /// One of `n` candidates (`at(i)`, `n` > 0) by the service's algorithm.
    fn choose<'a>(
        &self,
        n: usize,
        at: impl Fn(usize) -> &'a Arc<EndpointState>,
    ) -> &'a Arc<EndpointState> {
        match self.algorithm {
            Algorithm::RoundRobin => at(self.rr.fetch_add(1, Ordering::Relaxed) % n),
            // Envoy's least request: the better of two random choices (P2C).
            Algorithm::LeastConn => {
                let a = at(fastrand::usize(..n));
                let b = at(fastrand::usize(..n));
                if b.active.load(Ordering::Relaxed) < a.active.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
            // Maglev/weighted hash the client's connection in the kernel; per request the
            // gateway spreads them at random (Envoy's RANDOM), as the kernel's default does.
            Algorithm::Random | Algorithm::Weighted | Algorithm::Maglev => at(fastrand::usize(..n)),
        }
    }

    /// Records a failed request: after `consecutive_failures` in a row the endpoint is ejected
    /// for `base_ejection` × times ejected (capped at `max_ejection`), unless that would eject
    /// more than `max_ejection_percent` of the endpoints (at least one may always be), as
    /// Envoy's outlier detection and the kernel's circuit do. Returns whether it ejected.
    pub fn failure(&self, e: &EndpointState, epoch: Instant) -> bool {
        let limit = self.circuit.consecutive_failures;
        let n = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if limit == 0 || n < limit {
            return false;
        }
        let now = now_ms(epoch, Instant::now());
        let ejected = self
            .endpoints
            .iter()
            .filter(|x| x.ejected_until_ms.load(Ordering::Relaxed) > now)
            .count();
        let cap = (self.endpoints.len() * self.circuit.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            return false;
        }
        let times = e.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let d = self
            .circuit
            .base_ejection
            .saturating_mul(times)
            .min(self.circuit.max_ejection.max(self.circuit.base_ejection));
        let until = now + u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2);
        e.ejected_until_ms.store(until, Ordering::Relaxed);
        self.ejected_until_max.fetch_max(until, Ordering::Relaxed);
        e.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(service = %self.name, endpoint = %e.addr, ejection = ?d, "endpoint ejected after {n} consecutive failures");
        true
    }

    /// Records a successful request (resets the consecutive failures).
    pub fn success(e: &EndpointState) {
        // Read first: a store on every request would move the line between the workers.
        if e.consecutive_failures.load(Ordering::Relaxed) != 0 {
            e.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Endpoints ejected now (for status).
    #[must_use]
    pub fn ejected_now(&self, epoch: Instant) -> Vec<SocketAddr> {
        let now = now_ms(epoch, Instant::now());
        self.endpoints
            .iter()
            .filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) > now)
            .map(|e| e.addr)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn svc(n: u8, circuit: CircuitSettings) -> ServiceBackends {
        ServiceBackends {
            name: ObjectName::new("default", "web"),
            label: Arc::new(ObjectName::new("default", "web")),
            vips: Vec::new(),
            algorithm: Algorithm::RoundRobin,
            circuit,
            endpoints: (1..=n)
                .map(|i| {
                    Arc::new(EndpointState::new(
                        SocketAddr::from(([127, 0, 0, i], 80)),
                        None,
                    ))
                })
                .collect(),
            rr: AtomicUsize::new(0),
            ejected_until_max: Arc::default(),
        }
    }

    #[test]
    fn every_endpoint_ejected_fails_at_once_without_panic_mode() {
        let s = svc(
            2,
            CircuitSettings {
                consecutive_failures: 1,
                max_ejection_percent: 100,
                panic_threshold_percent: 0,
                ..CircuitSettings::default()
            },
        );
        let epoch = Instant::now();
        for e in s.endpoints.clone() {
            assert!(s.failure(&e, epoch));
        }
        assert_eq!(
            s.pick(None, epoch, &NoKernelCircuits).unwrap_err(),
            NoEndpoint::AllEjected
        );
    }

    #[test]
    fn the_ejection_cap_keeps_at_least_one_and_panic_mode_uses_all() {
        let s = svc(
            3,
            CircuitSettings {
                consecutive_failures: 1,
                ..CircuitSettings::default()
            },
        );
        let epoch = Instant::now();
        let eps = s.endpoints.clone();
        assert!(s.failure(&eps[0], epoch));
        assert!(
            !s.failure(&eps[1], epoch),
            "10 % of 3 rounds to the floor of one"
        );
        for _ in 0..10 {
            assert_ne!(
                s.pick(None, epoch, &NoKernelCircuits).unwrap().addr,
                eps[0].addr
            );
        }
    }

    #[test]
    fn an_ejection_after_one_ran_out_is_still_seen() {
        let s = svc(
            2,
            CircuitSettings {
                consecutive_failures: 1,
                max_ejection_percent: 50,
                base_ejection: Duration::from_secs(1),
                max_ejection: Duration::from_secs(1),
                ..CircuitSettings::default()
            },
        );
        let eps = s.endpoints.clone();
        let picks = |epoch| -> Vec<SocketAddr> {
            (0..4)
                .map(|_| s.pick(None, epoch, &NoKernelCircuits).unwrap().addr)
                .collect()
        };
        let epoch = Instant::now();
        assert!(s.failure(&eps[0], epoch));
        assert!(!picks(epoch).contains(&eps[0].addr));
        // An epoch 10 s back reads as 10 s later: the 1 s ejection is over, both endpoints are
        // picked (and the shared maximum goes back to 0).
        let later = epoch
            .checked_sub(Duration::from_secs(10))
            .expect("the monotonic clock is past 10 s");
        assert!(picks(later).contains(&eps[0].addr));
        assert_eq!(s.ejected_until_max.load(Ordering::Relaxed), 0);
        assert!(s.failure(&eps[1], later));
        assert!(!picks(later).contains(&eps[1].addr));
    }
}
