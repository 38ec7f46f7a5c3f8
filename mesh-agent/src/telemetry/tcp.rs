//! Istio's standard TCP metrics (`istio_tcp_connections_opened_total`, `…_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`) from the kernel's flow events:
//! an open event opens, a close event closes and carries the payload bytes each way (same-node
//! bypassed connections included: the kernel adds what `sk_msg` moved).
//!
//! Per event: one hash lookup keyed by the `Arc`s the flow already holds (client pod, service)
//! plus the destination pod's `Arc` from the snapshot — no allocation once the series exists.
//! Label strings are made at scrape time, where pods of one workload are summed.
//!
//! Cardinality: at most [`MAX_SERIES`] (client pod, service, destination pod) keys; a flow that
//! would add one more is not counted and `mesh_telemetry_series_dropped_total{family="tcp"}`
//! says how many were lost. A key whose pod or service is gone from the model and that saw no
//! flow for [`IDLE_EXPIRY`] is removed (`mesh_telemetry_series_expired_total`), so deleted
//! workloads do not hold series forever; Prometheus treats the vanished series as stale.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_common::{
    PROTO_UDP,
    event::{EV_CLOSE, EV_OPEN},
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::labels::{Peer, Reporter, Security, Value};
use crate::{datapath::ip_from_be, flows::FlowRecord, model::ObjectName, state::Snapshot};

/// Most (client pod, service, destination pod) keys kept. 10,000 × 4 families ≈ 40,000
/// exported series at most, what one Prometheus scrape of a node handles comfortably.
pub const MAX_SERIES: usize = 10_000;
/// A key of a deleted pod or service is removed after this long without a flow (Istio's
/// proxies keep a deleted peer's series until they restart; Prometheus' own staleness is 5 min).
pub const IDLE_EXPIRY: Duration = Duration::from_mins(5);
/// How often keys are checked for expiry.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(30);

/// What a series is counted under: the names a flow carries, shared with the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    source: Option<Arc<ObjectName>>,
    service: Option<Arc<ObjectName>>,
    destination: Option<Arc<ObjectName>>,
    /// Set for a stream of an HBONE tunnel (the proxies report it, `mutual_tls`): who reports
    /// and the two proven identities. `None` for the kernel's plaintext flows.
    tunnel: Option<Arc<TunnelKey>>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TunnelKey {
    reporter: Reporter,
    source_principal: String,
    destination_principal: String,
}

/// A tunnelled stream's open or close, as a proxy reports it.
#[derive(Clone, Copy, Debug)]
pub enum TunnelEvent {
    Open,
    /// `sent`: the response's bytes (server → client); `received`: the request's (Istio's).
    Close {
        sent: u64,
        received: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Series {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
    last: Instant,
}

/// The TCP metrics of the node's connections.
#[derive(Debug)]
pub struct TcpMetrics {
    series: Mutex<HashMap<Key, Series>>,
    max: usize,
    dropped: AtomicU64,
    expired: AtomicU64,
}

/// The pod behind the backend address of a flow (the destination workload).
#[must_use]
pub fn destination_pod(flow: &FlowRecord, snapshot: &Snapshot) -> Option<Arc<ObjectName>> {
    let e = &flow.event;
    (e.backend_id != 0)
        .then(|| snapshot.pod_by_ip(ip_from_be(e.backend_addr_be, e.family)))
        .flatten()
}

/// The backend address of a flow, when it has one.
#[must_use]
pub fn backend_addr(flow: &FlowRecord) -> Option<SocketAddr> {
    let e = &flow.event;
    let ip: IpAddr = ip_from_be(e.backend_addr_be, e.family);
    (e.backend_id != 0).then(|| SocketAddr::new(ip, u16::from_be(e.backend_port_be)))
}

impl TcpMetrics {
    /// Empty, keeping at most `max` keys.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            series: Mutex::new(HashMap::new()),
            max,
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    /// Counts one flow event (TCP opens and closes; other kinds and UDP are not Istio's TCP
    /// metrics).
    pub fn observe(&self, flow: &FlowRecord, destination: Option<&Arc<ObjectName>>) {
        let e = &flow.event;
        if e.proto == PROTO_UDP || (e.kind != EV_OPEN && e.kind != EV_CLOSE) {
            return;
        }
        let key = Key {
            source: flow.source.clone(),
            service: flow.service.clone(),
            destination: destination.cloned(),
            tunnel: None,
        };
        if e.kind == EV_OPEN {
            self.count(key, TunnelEvent::Open);
        } else {
            // Istio's `sent` is the response (server → client), `received` the request: the
            // client socket's received and sent bytes.
            self.count(
                key,
                TunnelEvent::Close {
                    sent: e.bytes_received,
                    received: e.bytes_sent,
                },
            );
        }
    }

    /// Counts one stream of an HBONE tunnel: `reporter` is the proxy's side, the pods and
    /// service as the snapshot names them, the identities as mTLS proved them.
    #[allow(clippy::too_many_arguments, reason = "one per Istio label source")]
    pub fn observe_tunnel(
        &self,
        reporter: Reporter,
        source: Option<Arc<ObjectName>>,
        service: Option<Arc<ObjectName>>,
        destination: Option<Arc<ObjectName>>,
        source_principal: &crate::identity::SpiffeId,
        destination_principal: &crate::identity::SpiffeId,
        event: TunnelEvent,
    ) {
        let key = Key {
            source,
            service,
            destination,
            tunnel: Some(Arc::new(TunnelKey {
                reporter,
                source_principal: source_principal.to_string(),
                destination_principal: destination_principal.to_string(),
            })),
        };
        self.count(key, event);
    }

    fn count(&self, key: Key, event: TunnelEvent) {
        let now = Instant::now();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let len = series.len();
        let s = match series.get_mut(&key) {
            Some(s) => s,
            None if len >= self.max => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            None => series.entry(key).or_insert(Series {
                opened: 0,
                closed: 0,
                sent: 0,
                received: 0,
                last: now,
            }),
        };
        s.last = now;
        match event {
            TunnelEvent::Open => s.opened += 1,
            TunnelEvent::Close { sent, received } => {
                s.closed += 1;
                s.sent += sent;
                s.received += received;
            }
        }
    }

    /// Removes keys naming a pod or service that `snapshot` no longer has, idle for
    /// [`IDLE_EXPIRY`] at `now`.
    pub fn expire(&self, snapshot: &Snapshot, now: Instant) {
        let gone_pod =
            |p: &Option<Arc<ObjectName>>| p.as_deref().is_some_and(|p| !snapshot.model.has_pod(p));
        let gone_service = |s: &Option<Arc<ObjectName>>| {
            s.as_deref()
                .is_some_and(|s| !snapshot.model.services.contains_key(s))
        };
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let before = series.len();
        series.retain(|k, s| {
            now.duration_since(s.last) < IDLE_EXPIRY
                || !(gone_pod(&k.source) || gone_pod(&k.destination) || gone_service(&k.service))
        });
        self.expired
            .fetch_add((before - series.len()) as u64, Ordering::Relaxed);
    }

    /// Keys held now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No key held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The series by Istio label values (pods of one workload summed):
    /// (labels, [opened, closed, sent, received]).
    /// Its cardinality bound and what it cost.
    #[must_use]
    pub fn bound(&self) -> super::Bound {
        super::Bound {
            family: "tcp",
            len: self
                .series
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            max: self.max,
            dropped: self.dropped.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }

    /// The keys and their counts, copied under the lock (so recording waits only for a copy).
    fn copy(&self) -> Vec<(Key, Series)> {
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), *s))
            .collect()
    }

    /// The four `istio_tcp_*` families in the Prometheus text format (`openmetrics`: the
    /// `OpenMetrics` one), appended to `out` — what encoding [`TcpMetrics`] as a
    /// prometheus-client [`Collector`] writes (a test holds them equal), made directly: each
    /// series' label set is written once and copied into the four families, values are
    /// grouped by the names they are made of (no `String` per label value, no `Vec` of pairs
    /// per series and family). At 10,000 keys this is 40,000 series and ~30 MB of text.
    ///
    /// # Errors
    /// Never in practice (writing to a `String`); the descriptor encoder's signature.
    pub fn encode_text(&self, out: &mut String, openmetrics: bool) -> fmt::Result {
        let copy = self.copy();
        let groups = grouped(&copy);
        let mut labels = String::with_capacity(groups.len() * 800);
        let mut ends = Vec::with_capacity(groups.len());
        for (values, _) in &groups {
            super::labels::write_pairs(&mut labels, values);
            ends.push(labels.len());
        }
        for (i, (name, help)) in FAMILIES.into_iter().enumerate() {
            out.push_str(&family_header(name, help, openmetrics)?);
            let mut start = 0;
            for ((_, sums), &end) in groups.iter().zip(&ends) {
                out.reserve(name.len() + (end - start) + 32);
                out.push_str(name);
                out.push_str("_total{");
                out.push_str(&labels[start..end]);
                out.push_str("} ");
                let _ = fmt::Write::write_fmt(out, format_args!("{}", sums[i]));
                out.push('\n');
                start = end;
            }
        }
        Ok(())
    }
}

/// The families, in the order they are written: (name, help).
const FAMILIES: [(&str, &str); 4] = [
    (
        "istio_tcp_connections_opened",
        "TCP connections opened (Istio standard metric; from the kernel's flow events).",
    ),
    (
        "istio_tcp_connections_closed",
        "TCP connections closed (Istio standard metric; from the kernel's flow events).",
    ),
    (
        "istio_tcp_sent_bytes",
        "Payload bytes sent during the response (server to client), counted at close (Istio standard metric).",
    ),
    (
        "istio_tcp_received_bytes",
        "Payload bytes received during the request (client to server), counted at close (Istio standard metric).",
    ),
];

/// A counter family's `# HELP`/`# TYPE` lines exactly as prometheus-client writes them.
fn family_header(
    name: &'static str,
    help: &'static str,
    openmetrics: bool,
) -> Result<String, fmt::Error> {
    #[derive(Debug)]
    struct Header(&'static str, &'static str);
    impl Collector for Header {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            enc.encode_descriptor(self.0, self.1, None, MetricType::Counter)
                .map(drop)
        }
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Header(name, help)));
    let mut text = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        let body = text.strip_suffix(EOF).ok_or(fmt::Error)?.len();
        text.truncate(body);
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    }
    Ok(text)
}

/// The `OpenMetrics` text's last line.
pub const EOF: &str = "# EOF\n";

/// What a series' labels are made of: keys equal here have equal label values (two pods of one
/// workload), so their counts are summed into one series. Ordered service first, where keys
/// usually differ, so sorting compares little.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Group<'a> {
    service: Option<&'a ObjectName>,
    /// (workload, namespace) of the destination and source pods.
    destination: Option<(&'a str, &'a str)>,
    source: Option<(&'a str, &'a str)>,
    /// Reporter and the two principals of a tunnel's stream; `None` for a kernel flow.
    tunnel: Option<(Reporter, &'a str, &'a str)>,
}

impl<'a> Group<'a> {
    fn of(k: &'a Key) -> Self {
        let pod = |p: &'a Option<Arc<ObjectName>>| {
            p.as_deref()
                .map(|p| (super::labels::workload_name(&p.name), p.namespace.as_str()))
        };
        Self {
            service: k.service.as_deref(),
            destination: pod(&k.destination),
            source: pod(&k.source),
            tunnel: k.tunnel.as_deref().map(|t| {
                (
                    t.reporter,
                    t.source_principal.as_str(),
                    t.destination_principal.as_str(),
                )
            }),
        }
    }
}

/// The series by Istio label values (pods of one workload summed), in a stable order:
/// (values, [opened, closed, sent, received]). One sort of the keys and a merge of neighbours
/// (no map keyed by 23 strings, whose hashing and ordering cost more than the rest).
fn grouped(copy: &[(Key, Series)]) -> Vec<([Value<'_>; 23], [u64; 4])> {
    let mut keys: Vec<(Group<'_>, usize)> = copy
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (Group::of(k), i))
        .collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<([Value<'_>; 23], [u64; 4])> = Vec::with_capacity(keys.len());
    let mut last: Option<Group<'_>> = None;
    for (group, i) in keys {
        let (k, s) = &copy[i];
        let counts = [s.opened, s.closed, s.sent, s.received];
        if last == Some(group)
            && let Some((_, sum)) = out.last_mut()
        {
            for (a, b) in sum.iter_mut().zip(counts) {
                *a += b;
            }
            continue;
        }
        last = Some(group);
        let t = k.tunnel.as_deref();
        let values = super::labels::values(
            t.map_or(Reporter::Source, |t| t.reporter),
            Peer {
                pod: k.source.as_deref(),
                principal: t.map(|t| t.source_principal.as_str()),
            },
            k.service.as_deref(),
            Peer {
                pod: k.destination.as_deref(),
                principal: t.map(|t| t.destination_principal.as_str()),
            },
            "tcp",
            // The kernel sees the plaintext connections of pods; the tunnels' streams are the
            // proxies' to report, as `mutual_tls`.
            if t.is_some() {
                Security::MutualTls
            } else {
                Security::None
            },
        );
        out.push((values, counts));
    }
    out
}

impl Collector for TcpMetrics {
    /// The same families through prometheus-client's encoder (the reference
    /// [`TcpMetrics::encode_text`] is tested against; the scrape uses the direct one).
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let copy = self.copy();
        let all = grouped(&copy);
        for (i, (name, help)) in FAMILIES.into_iter().enumerate() {
            super::counter_family(
                &mut enc,
                name,
                help,
                all.iter().map(|(values, v)| {
                    let strings: Vec<String> = values.iter().map(ToString::to_string).collect();
                    let pairs: Vec<(&str, String)> = super::labels::COMMON_LABELS
                        .iter()
                        .copied()
                        .zip(strings)
                        .collect();
                    (pairs, v[i])
                }),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::{FAMILY_V4, PROTO_TCP, event::FlowEvent};

    use super::*;
    use crate::model::{ClusterModel, Pod};

    fn flow(kind: u8, source: &Arc<ObjectName>, service: &Arc<ObjectName>) -> FlowRecord {
        FlowRecord {
            event: FlowEvent {
                kind,
                family: FAMILY_V4,
                proto: PROTO_TCP,
                backend_id: 1,
                bytes_sent: 100,
                bytes_received: 7,
                ..FlowEvent::default()
            },
            time_unix_nano: 0,
            source: Some(Arc::clone(source)),
            service: Some(Arc::clone(service)),
        }
    }

    fn text(m: &Arc<TcpMetrics>) -> String {
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(Arc::clone(m)));
        let mut s = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut s, &r).unwrap();
        s
    }

    #[test]
    fn opens_closes_and_bytes_sum_per_workload_and_the_bound_drops_and_counts() {
        let m = Arc::new(TcpMetrics::new(2));
        let a = Arc::new(ObjectName::new("shop", "client-5f6b7c9d8-zt2p4"));
        let b = Arc::new(ObjectName::new("shop", "client-5f6b7c9d8-xx2p4"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        let db = Arc::new(ObjectName::new("shop", "db"));
        for (src, kind) in [(&a, EV_OPEN), (&a, EV_CLOSE), (&b, EV_OPEN), (&b, EV_CLOSE)] {
            m.observe(&flow(kind, src, &web), None);
        }
        // A third key is over the bound of 2.
        m.observe(&flow(EV_OPEN, &a, &db), None);
        // UDP and other kinds are not counted at all.
        let mut udp = flow(EV_OPEN, &a, &web);
        udp.event.proto = PROTO_UDP;
        m.observe(&udp, None);
        m.observe(&flow(mesh_common::event::EV_REJECT, &a, &web), None);
        let t = text(&m);
        let line = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name) && l.contains("destination_service_name=\"web\""))
                .unwrap_or_else(|| panic!("{name} in {t}"))
                .rsplit_once(' ')
                .unwrap()
                .1
                .to_owned()
        };
        // Two pods of the Deployment `client` are one workload: one series.
        assert_eq!(line("istio_tcp_connections_opened_total{"), "2");
        assert_eq!(line("istio_tcp_connections_closed_total{"), "2");
        // Istio's directions: sent = the response (what the client received), received = the
        // request (what the client sent).
        assert_eq!(line("istio_tcp_sent_bytes_total{"), "14");
        assert_eq!(line("istio_tcp_received_bytes_total{"), "200");
        assert!(t.contains("source_workload=\"client\""), "{t}");
        assert!(!t.contains("destination_service_name=\"db\""), "{t}");
        assert_eq!((m.bound().len, m.bound().dropped), (2, 1));
    }

    #[test]
    fn the_direct_text_is_what_prometheus_client_writes_in_both_formats() {
        let m = Arc::new(TcpMetrics::new(100));
        let a = Arc::new(ObjectName::new("shop", "client-5f6b7c9d8-zt2p4"));
        let b = Arc::new(ObjectName::new("shop", "client-5f6b7c9d8-xx2p4"));
        let odd = Arc::new(ObjectName::new("we\"ird", "back\\slash\nline"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        for (src, kind) in [
            (&a, EV_OPEN),
            (&a, EV_CLOSE),
            (&b, EV_OPEN),
            (&odd, EV_CLOSE),
        ] {
            m.observe(&flow(kind, src, &web), Some(&web));
            m.observe(&flow(kind, src, &odd), None);
        }
        let id: crate::identity::SpiffeId =
            "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        m.observe_tunnel(
            Reporter::Destination,
            Some(Arc::clone(&a)),
            Some(Arc::clone(&web)),
            None,
            &id,
            &id,
            TunnelEvent::Close {
                sent: 5,
                received: 6,
            },
        );
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(Arc::clone(&m)));
        for openmetrics in [false, true] {
            let mut reference = String::new();
            if openmetrics {
                prometheus_client::encoding::text::encode(&mut reference, &r).unwrap();
                reference.truncate(reference.len() - EOF.len());
            } else {
                prometheus_client::encoding::prometheus_text::encode(&mut reference, &r).unwrap();
            }
            let mut direct = String::new();
            m.encode_text(&mut direct, openmetrics).unwrap();
            assert_eq!(direct, reference, "openmetrics: {openmetrics}");
            assert_eq!(
                direct.lines().filter(|l| !l.starts_with('#')).count(),
                4 * 5
            );
            assert!(
                direct.contains(r#"source_workload_namespace="we\"ird""#),
                "{direct}"
            );
            assert!(
                direct.contains(r#"destination_service_name="back\\slash\nline""#),
                "{direct}"
            );
        }
    }

    #[test]
    fn series_of_deleted_pods_expire_after_idling_and_live_ones_stay() {
        let m = TcpMetrics::new(10);
        let live = Arc::new(ObjectName::new("shop", "live"));
        let gone = Arc::new(ObjectName::new("shop", "gone"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        m.observe(&flow(EV_OPEN, &live, &web), None);
        m.observe(&flow(EV_OPEN, &gone, &web), None);
        let mut model = ClusterModel::default();
        model.pods.insert(
            (*live).clone(),
            Arc::new(Pod {
                name: (*live).clone(),
                node: "a".into(),
                service_account: "default".into(),
                ips: vec![],
                uid: String::new(),
                host_network: false,
            }),
        );
        model.services.insert(
            (*web).clone(),
            crate::model::Service {
                name: (*web).clone(),
                cluster_ips: vec![],
                ports: vec![],
                settings: crate::model::ServiceSettings::default(),
                endpoints: vec![],
                internal_traffic_policy: crate::model::TrafficPolicy::default(),
            },
        );
        let snap = Snapshot::build(1, model, crate::reconcile::AppliedServices::new());
        m.expire(&snap, Instant::now());
        assert_eq!(m.len(), 2, "not idle yet");
        m.expire(&snap, Instant::now() + IDLE_EXPIRY);
        assert_eq!(
            m.len(),
            1,
            "the deleted pod's series went, the live one stayed"
        );
        assert_eq!(m.expired.load(Ordering::Relaxed), 1);
    }
}
