//! `mesh_*` metrics read at scrape time: every kernel reason counter (summed over the per-CPU
//! `COUNTERS` map by the data-path owner now — never counted per event in userspace), circuit
//! state and ejections per backend, map usage against capacity, flow events received and lost,
//! certificates, proxy counters, the agent's health, and the process.

use std::{fmt, sync::Arc, time::Duration};

use mesh_common::{
    PROTO_UDP,
    backend::{BACKENDS_CAPACITY, CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN},
    counters::COUNTER_NAMES,
    service::{
        LB_TABLES_CAPACITY, LbChunk, SERVICE_CONF_CAPACITY, SERVICES_CAPACITY, SLOTS_CAPACITY,
    },
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{counter, counter_family, gauge, gauge_family, process};
use crate::{
    app::Shared,
    datapath::{BackendStatus, ip_from_be},
    identity::manager::CertStatus,
    model::ObjectName,
};

/// Longest wait for the data-path owner at a scrape (it may be busy reconciling a large model);
/// past it the scrape uses the counters it published last and says how old they are.
pub const OWNER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most per-backend circuit series: only backends whose circuit is not closed or that were
/// ejected at least once are exported one by one (at 10,000 services × 10 backends, one series
/// per backend would be 100,000); every backend is in `mesh_backends{circuit}`.
pub const MAX_BACKEND_SERIES: usize = 1_000;

/// One backend exported with its own series.
#[derive(Clone, Debug)]
struct BackendRow {
    service: Arc<ObjectName>,
    vip: String,
    status: BackendStatus,
}

/// Everything one scrape reports beside the long-lived families.
#[derive(Debug, Default)]
pub struct Scrape {
    counters: Vec<(&'static str, u64)>,
    /// Seconds since `counters` were read (0: read for this scrape).
    counters_age: f64,
    counters_error: bool,
    agent_counters: Vec<(&'static str, u64)>,
    /// (map, entries, capacity).
    maps: Vec<(&'static str, u64, u64)>,
    backends: Vec<BackendRow>,
    /// Backends by circuit: closed, open, half-open.
    circuits: [u64; 3],
    backend_rows_dropped: u64,
    backends_read: bool,
    map_full_total: u64,
    lb_table_bytes: u64,
    retired_backends: u64,
    flows_received: u64,
    flows_lagged: u64,
    certs: Option<(Vec<CertStatus>, u64, u64)>,
    proxy: Vec<(&'static str, u64)>,
    tunnels: (u64, u64),
    ready: bool,
    generation: u64,
    rejections: u64,
    reconcile_errors: u64,
    sources: Vec<(String, bool, u32)>,
    process: Option<process::ProcessStats>,
}

impl Scrape {
    /// Reads everything for one scrape.
    pub async fn gather(shared: &Shared) -> Self {
        let kernel = shared.stores.kernel.load_full();
        let snapshot = shared.stores.snapshot.load_full();
        let status = shared.stores.status.load_full();
        let mut s = Self::default();
        match tokio::time::timeout(OWNER_TIMEOUT, shared.datapath.counters()).await {
            Ok(Ok(c)) => s.counters = c,
            other => {
                s.counters_error = matches!(other, Ok(Err(_)));
                s.counters = kernel
                    .counters
                    .iter()
                    .copied()
                    .filter(|(n, _)| COUNTER_NAMES.contains(n))
                    .collect();
                s.counters_age = kernel
                    .read_at
                    .map_or(f64::INFINITY, |t| t.elapsed().as_secs_f64());
            }
        }
        s.agent_counters = kernel
            .counters
            .iter()
            .copied()
            .filter(|(n, _)| !COUNTER_NAMES.contains(n))
            .collect();
        s.map_full_total = kernel.map_full_total;
        s.lb_table_bytes = kernel.lb_table_bytes;
        s.retired_backends = kernel.retired_backends;
        let services = snapshot.services.len() as u64;
        let backends = snapshot.backends as u64;
        s.maps = vec![
            ("SERVICES", services, u64::from(SERVICES_CAPACITY)),
            // One configuration per service address between reconciliations.
            (
                "SERVICE_CONF_V2",
                services,
                u64::from(SERVICE_CONF_CAPACITY),
            ),
            ("BACKEND_ADDRS", backends, u64::from(BACKENDS_CAPACITY)),
            // One range per configuration (plus ranges in their 1-s quarantine).
            ("SERVICE_SLOTS", backends, u64::from(SLOTS_CAPACITY)),
            (
                "BACKEND_STATE",
                backends + kernel.retired_backends,
                u64::from(BACKENDS_CAPACITY),
            ),
            (
                "LB_TABLES",
                kernel.lb_table_bytes / size_of::<LbChunk>() as u64,
                u64::from(LB_TABLES_CAPACITY),
            ),
        ];
        s.read_backends(shared, &snapshot).await;
        s.flows_received = shared.flows.received_total();
        s.flows_lagged = shared.flows.lagged_total();
        if let Some(m) = crate::identity::manager::global() {
            let c = m.counters();
            s.certs = Some((
                m.status(),
                c.issued.load(std::sync::atomic::Ordering::Relaxed),
                c.failures.load(std::sync::atomic::Ordering::Relaxed),
            ));
        }
        s.proxy = shared.proxy_stats.counters.snapshot();
        for t in shared.proxy_stats.tunnels() {
            match t.direction {
                crate::proxy::stats::Direction::Outbound => s.tunnels.0 += 1,
                crate::proxy::stats::Direction::Inbound => s.tunnels.1 += 1,
            }
        }
        s.ready = status.ready;
        s.generation = snapshot.generation;
        s.rejections = status.rejections.len() as u64;
        s.reconcile_errors = status.reconcile_errors.len() as u64;
        s.sources = status
            .sources
            .iter()
            .map(|(name, h)| {
                (
                    name.clone(),
                    matches!(h.state, crate::state::SourceState::Running { .. }),
                    h.restarts(),
                )
            })
            .collect();
        s.process = process::read();
        s
    }

    /// Circuit state of every backend (through the owner), bounded per-backend rows.
    async fn read_backends(&mut self, shared: &Shared, snapshot: &crate::state::Snapshot) {
        let s = self;
        let keys: Vec<_> = snapshot.services.keys().copied().collect();
        if let Ok(Ok(all)) =
            tokio::time::timeout(OWNER_TIMEOUT, shared.datapath.backend_status(keys)).await
        {
            s.backends_read = true;
            for (key, backends) in all {
                let Some(svc) = snapshot.services.get(&key) else {
                    continue;
                };
                let vip = format!(
                    "{}/{}",
                    std::net::SocketAddr::new(
                        ip_from_be(key.addr_be, key.family),
                        u16::from_be(key.port_be)
                    ),
                    if key.proto == PROTO_UDP { "UDP" } else { "TCP" }
                );
                for b in backends {
                    let i = match b.state.circuit {
                        CIRCUIT_OPEN => 1,
                        CIRCUIT_HALF_OPEN => 2,
                        _ => 0,
                    };
                    s.circuits[i] += 1;
                    if b.state.circuit == CIRCUIT_CLOSED && b.state.ejections == 0 {
                        continue;
                    }
                    if s.backends.len() >= MAX_BACKEND_SERIES {
                        s.backend_rows_dropped += 1;
                        continue;
                    }
                    s.backends.push(BackendRow {
                        service: Arc::clone(&svc.name),
                        vip: vip.clone(),
                        status: b,
                    });
                }
            }
        }
    }
}

fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Collector for Scrape {
    #[expect(
        clippy::too_many_lines,
        reason = "one flat list of families, in the order the README documents them"
    )]
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        counter_family(
            e,
            "mesh_kernel_reasons",
            "Kernel reason counters (per-CPU COUNTERS map summed at scrape): every translation, reject, drop and circuit decision.",
            self.counters.iter().map(|(n, v)| ([("reason", *n)], *v)),
        )?;
        gauge(
            e,
            "mesh_kernel_counters_age_seconds",
            "Age of the kernel counters in this scrape: 0 when read for it, else the owner was busy and the last published read is shown.",
            self.counters_age,
        )?;
        gauge(
            e,
            "mesh_kernel_counters_read_error",
            "1 when the last read of the kernel counters failed.",
            if self.counters_error { 1.0 } else { 0.0 },
        )?;
        for (name, v) in &self.agent_counters {
            let (metric, help) = match *name {
                "udp_sockets_destroyed" => (
                    "mesh_udp_sockets_destroyed",
                    "Connected UDP sockets ended because their backend left the service.",
                ),
                "udp_socket_destroy_failed" => (
                    "mesh_udp_socket_destroy_failures",
                    "UDP sockets of removed backends that could not be ended (or namespaces not searched).",
                ),
                _ => continue,
            };
            counter(e, metric, help, *v)?;
        }
        gauge_family(
            e,
            "mesh_map_entries",
            "Entries the agent keeps in each kernel map.",
            self.maps.iter().map(|(m, n, _)| ([("map", *m)], *n as f64)),
        )?;
        gauge_family(
            e,
            "mesh_map_capacity",
            "Capacity of each kernel map (max_entries).",
            self.maps.iter().map(|(m, _, c)| ([("map", *m)], *c as f64)),
        )?;
        counter(
            e,
            "mesh_map_full",
            "Writes the agent refused because a kernel map would have overflowed.",
            self.map_full_total,
        )?;
        gauge(
            e,
            "mesh_lb_table_bytes",
            "Kernel memory in Maglev/weighted lookup tables.",
            self.lb_table_bytes as f64,
        )?;
        gauge(
            e,
            "mesh_retired_backends",
            "Removed backends whose kernel state slots are still quarantined.",
            self.retired_backends as f64,
        )?;
        if self.backends_read {
            gauge_family(
                e,
                "mesh_backends",
                "Backends of all services by circuit state.",
                [
                    ([("circuit", "closed")], self.circuits[0] as f64),
                    ([("circuit", "open")], self.circuits[1] as f64),
                    ([("circuit", "half_open")], self.circuits[2] as f64),
                ],
            )?;
            let rows = || {
                self.backends.iter().map(|r| {
                    [
                        ("service_namespace", r.service.namespace.clone()),
                        ("service", r.service.name.clone()),
                        ("vip", r.vip.clone()),
                        ("backend", r.status.addr.to_string()),
                    ]
                })
            };
            gauge_family(
                e,
                "mesh_backend_circuit",
                "Circuit of a backend that is not closed or was ejected before: 0 closed, 1 open, 2 half-open.",
                rows().zip(&self.backends).map(|(l, r)| {
                    (
                        l,
                        match r.status.state.circuit {
                            CIRCUIT_OPEN => 1.0,
                            CIRCUIT_HALF_OPEN => 2.0,
                            _ => 0.0,
                        },
                    )
                }),
            )?;
            counter_family(
                e,
                "mesh_backend_ejections",
                "Times the kernel opened a backend's circuit (backends ejected at least once).",
                rows()
                    .zip(&self.backends)
                    .map(|(l, r)| (l, u64::from(r.status.state.ejections))),
            )?;
            counter_family(
                e,
                "mesh_backend_failures",
                "Failed connects to a backend (backends ejected at least once).",
                rows()
                    .zip(&self.backends)
                    .map(|(l, r)| (l, r.status.state.failures)),
            )?;
            gauge_family(
                e,
                "mesh_backend_active_connections",
                "Open connections to a backend (backends ejected at least once).",
                rows()
                    .zip(&self.backends)
                    .map(|(l, r)| (l, r.status.state.active as f64)),
            )?;
            counter(
                e,
                "mesh_backend_series_dropped",
                "Backends not exported one by one in this scrape because mesh_backend_* reached its bound.",
                self.backend_rows_dropped,
            )?;
        }
        counter(
            e,
            "mesh_flow_events_received",
            "Flow events read from the kernel ring.",
            self.flows_received,
        )?;
        let ring_dropped = self
            .counters
            .iter()
            .find(|(n, _)| *n == "event_dropped")
            .map_or(0, |(_, v)| *v);
        counter_family(
            e,
            "mesh_flow_events_lost",
            "Flow events lost: in the kernel (ring full) or by live watchers that fell behind.",
            [
                ([("stage", "kernel_ring")], ring_dropped),
                ([("stage", "watchers")], self.flows_lagged),
            ],
        )?;
        if let Some((certs, issued, failures)) = &self.certs {
            gauge_family(
                e,
                "mesh_certificate_expiry_timestamp_seconds",
                "When the workload certificate of an identity expires (Unix seconds).",
                certs.iter().filter_map(|c| {
                    c.not_after
                        .map(|t| ([("identity", c.id.to_string())], unix_seconds(t)))
                }),
            )?;
            let mut by_state = std::collections::BTreeMap::from([
                ("pending", 0u64),
                ("valid", 0),
                ("renewing", 0),
                ("expired", 0),
            ]);
            for c in certs {
                *by_state.entry(c.state.as_str()).or_default() += 1;
            }
            gauge_family(
                e,
                "mesh_certificates",
                "Workload identities on this node by certificate state.",
                by_state
                    .into_iter()
                    .map(|(s, n)| ([("state", s)], n as f64)),
            )?;
            counter(
                e,
                "mesh_certificates_issued",
                "Workload certificates received from the CA (first issue and renewals).",
                *issued,
            )?;
            counter(
                e,
                "mesh_certificate_request_failures",
                "Certificate requests that failed (each retry counts).",
                *failures,
            )?;
        }
        counter_family(
            e,
            "mesh_proxy_events",
            "HBONE proxy counters (connections, streams, and every refusal by reason).",
            self.proxy.iter().map(|(n, v)| ([("event", *n)], *v)),
        )?;
        gauge_family(
            e,
            "mesh_tunnels",
            "Open HBONE connections by direction.",
            [
                ([("direction", "outbound")], self.tunnels.0 as f64),
                ([("direction", "inbound")], self.tunnels.1 as f64),
            ],
        )?;
        gauge(
            e,
            "mesh_agent_ready",
            "1 when the agent is ready (a model is in the kernel and every source runs).",
            if self.ready { 1.0 } else { 0.0 },
        )?;
        gauge(
            e,
            "mesh_snapshot_generation",
            "Reconciliations published so far.",
            self.generation as f64,
        )?;
        gauge(
            e,
            "mesh_rejections",
            "Current rejections (files or object fields that are invalid).",
            self.rejections as f64,
        )?;
        gauge(
            e,
            "mesh_reconcile_last_errors",
            "Errors of the last reconciliation.",
            self.reconcile_errors as f64,
        )?;
        gauge_family(
            e,
            "mesh_discovery_source_up",
            "1 while a discovery source runs.",
            self.sources
                .iter()
                .map(|(n, up, _)| ([("source", n.clone())], if *up { 1.0 } else { 0.0 })),
        )?;
        counter_family(
            e,
            "mesh_discovery_source_restarts",
            "Restarts of a discovery source.",
            self.sources
                .iter()
                .map(|(n, _, r)| ([("source", n.clone())], u64::from(*r))),
        )?;
        gauge_family(
            e,
            "mesh_build_info",
            "The agent's version (always 1).",
            [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
        )?;
        process::encode(e, self.process.as_ref())
    }
}
