//! The admin API: tonic gRPC on a Unix socket only root can open (`meshctl` is the client).
//! Every call but `ListBackends` answers from the published snapshots and never waits for a
//! reconciliation; `ListBackends` reads live circuit state through the data-path owner.

use std::{
    ops::Bound,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper_util::rt::TokioIo;
use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN},
    service::ServiceKey,
};
use tokio_stream::{Stream, StreamExt as _, wrappers::UnixListenerStream};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint, Uri},
};
use tracing::{info, warn};

use crate::{
    app::Shared,
    config::{Source, algorithm_name},
    flows::{FlowHub, FlowRecord, Followed, Sequenced, monotonic_ns},
    reconcile::{AppliedService, AppliedServices},
    state::SourceState,
};

/// Generated from `proto/admin.proto`.
#[expect(clippy::pedantic, missing_docs, reason = "generated code")]
pub mod proto {
    tonic::include_proto!("mesh.admin.v1");
}

use proto::{
    BackendInfo, ConfigDumpRequest, ConfigDumpResponse, CurrentRejection, Flow, IdentityInfo,
    ListBackendsRequest, ListBackendsResponse, ListIdentitiesRequest, ListIdentitiesResponse,
    ListPoliciesRequest, ListPoliciesResponse, ListServicesRequest, ListServicesResponse,
    ListTunnelsRequest, ListTunnelsResponse, ReportBackendResultRequest,
    ReportBackendResultResponse, ServiceInfo, SourceStatus, StatusRequest, StatusResponse,
    WatchFlowsRequest,
    admin_client::AdminClient,
    admin_server::{Admin, AdminServer},
};

/// Connects to the admin socket (`meshctl` and the benchmarks use this).
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let path = socket.to_owned();
    // The URI is required by tonic but unused: the connector always dials the Unix socket.
    let channel = Endpoint::from_static("http://mesh-agent.invalid")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(AdminClient::new(channel))
}

/// Serves the admin API on `socket` (mode 0600) until the process ends.
pub async fn serve(socket: PathBuf, shared: Arc<Shared>) {
    if let Some(dir) = socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&socket);
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(socket = %socket.display(), error = %e, "admin API not served");
            return;
        }
    };
    if let Err(e) = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)) {
        warn!(socket = %socket.display(), error = %e, "cannot restrict the admin socket to root");
    }
    info!(socket = %socket.display(), "admin API listening");
    let result = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService { shared }))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await;
    if let Err(e) = result {
        warn!(error = %e, "admin API stopped");
    }
}

/// The admin API's implementation (also behind the relay's mTLS flow API, `relay::flow_api`).
pub(crate) struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// `name` or `namespace/name` → `namespace/name`.
fn qualified(service: &str) -> String {
    if service.contains('/') {
        service.to_owned()
    } else {
        format!("default/{service}")
    }
}

/// Items per page when a request sets no `limit` (kubectl's `--chunk-size`).
pub const DEFAULT_PAGE: usize = 500;
/// The largest page served, whatever `limit` asks: bounds the cost of one call.
pub const MAX_PAGE: usize = 5_000;
/// Prefix of a continue token (its format's version).
const CONTINUE_V1: &str = "v1.";

/// A request's `limit` → the page size served.
fn page_limit(limit: u32) -> usize {
    match usize::try_from(limit) {
        Ok(0) => DEFAULT_PAGE,
        Ok(n) => n.min(MAX_PAGE),
        Err(_) => MAX_PAGE,
    }
}

/// The continue token naming `key` (the last service address of a page): the address, port,
/// protocol and family as the kernel key holds them, in hex.
fn encode_continue(key: &ServiceKey) -> String {
    let [a, b, c, d] = key.addr_be;
    format!(
        "{CONTINUE_V1}{a:08x}{b:08x}{c:08x}{d:08x}{:04x}{:02x}{:02x}",
        key.port_be, key.proto, key.family
    )
}

/// A request's continue token → the service address to list after (`None`: from the start).
fn decode_continue(token: &str) -> Result<Option<ServiceKey>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "continue_token {token:?}: {why}; pass the continue_token of the previous page unchanged, or none to start over"
        ))
    };
    let hex = token
        .strip_prefix(CONTINUE_V1)
        .ok_or_else(|| bad("unknown format"))?;
    if hex.len() != 40 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("not 40 hex digits after the prefix"));
    }
    let field = |from: usize, len: usize| u32::from_str_radix(&hex[from..from + len], 16);
    let parsed = (|| -> Result<ServiceKey, std::num::ParseIntError> {
        Ok(ServiceKey {
            addr_be: [field(0, 8)?, field(8, 8)?, field(16, 8)?, field(24, 8)?],
            port_be: u16::from_str_radix(&hex[32..36], 16)?,
            proto: u8::from_str_radix(&hex[36..38], 16)?,
            family: u8::from_str_radix(&hex[38..40], 16)?,
        })
    })();
    parsed.map(Some).map_err(|_| bad("not hex"))
}

/// The range of a snapshot's services after `after` (all of them for `None`).
fn after_bound(after: Option<ServiceKey>) -> (Bound<ServiceKey>, Bound<ServiceKey>) {
    (
        after.map_or(Bound::Unbounded, Bound::Excluded),
        Bound::Unbounded,
    )
}

/// The page of `services` after `after`: at most `limit` of them, and the continue token for
/// the next page ("" after the last). Only this page is built: a range over the snapshot's
/// ordered map, nothing cloned but the fields sent.
fn services_page(
    services: &AppliedServices,
    after: Option<ServiceKey>,
    limit: usize,
) -> (Vec<ServiceInfo>, String) {
    let mut rest = services.range(after_bound(after));
    let mut page = Vec::with_capacity(limit.min(services.len()));
    let mut last = None;
    for (key, a) in rest.by_ref().take(limit) {
        page.push(service_info(a));
        last = Some(key);
    }
    let continue_token = match (last, rest.next()) {
        (Some(key), Some(_)) => encode_continue(key),
        _ => String::new(),
    };
    (page, continue_token)
}

/// One service address as `ListServices` shows it.
fn service_info(a: &AppliedService) -> ServiceInfo {
    let spec = &a.spec;
    ServiceInfo {
        namespace: a.name.namespace.clone(),
        name: a.name.name.clone(),
        address: spec.vip.to_string(),
        protocol: format!("{:?}", spec.protocol).to_uppercase(),
        algorithm: algorithm_name(spec.algorithm).to_owned(),
        backends: spec.backends.len() as u32,
        max_connections: spec.circuit.max_connections,
        consecutive_failures: spec.circuit.consecutive_failures,
        base_ejection_ms: spec.circuit.base_ejection.as_millis() as u64,
        max_ejection_percent: spec.circuit.max_ejection_percent,
        affinity_timeout_seconds: spec.affinity_timeout.map_or(0, |d| d.as_secs()),
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.shared;
        let snap = s.stores.snapshot.load();
        let status = s.stores.status.load();
        let kernel = s.stores.kernel.load();
        let now = SystemTime::now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        let mut rejections: Vec<_> = status.rejections.iter().collect();
        rejections.sort_by_key(|(_, r)| r.since);
        Ok(Response::new(StatusResponse {
            node: s.config.node.clone(),
            source: match &s.config.discovery.source {
                Source::File(p) => format!("file {}", p.display()),
                Source::Kubernetes => "kubernetes".to_owned(),
            },
            ready: status.ready,
            uptime_seconds: s.started.elapsed().as_secs(),
            services: snap.services.len() as u32,
            backends: snap.backends as u32,
            last_rejection: status.last_rejection().unwrap_or_default(),
            pin_dir: s.config.datapath.pin_dir.display().to_string(),
            cgroup: s.config.datapath.cgroup.display().to_string(),
            counters: kernel
                .counters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            map_full_total: kernel.map_full_total,
            lb_table_bytes: kernel.lb_table_bytes,
            retired_backends: kernel.retired_backends,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            not_ready_reason: status.not_ready_reason.clone(),
            rejections: rejections
                .into_iter()
                .map(|(key, r)| CurrentRejection {
                    key: key.to_string(),
                    kind: r.rejection.kind().to_owned(),
                    source: r.source.clone(),
                    message: r.rejection.to_string(),
                    age_seconds: age(r.since).as_secs(),
                })
                .collect(),
            sources: status
                .sources
                .iter()
                .map(|(name, h)| {
                    let (state, reason) = match &h.state {
                        SourceState::Starting { .. } => ("starting", String::new()),
                        SourceState::Running { .. } => ("running", String::new()),
                        SourceState::Down { reason, .. } => ("down", reason.clone()),
                    };
                    SourceStatus {
                        name: name.clone(),
                        state: state.to_owned(),
                        reason,
                        restarts: h.restarts(),
                        synced: h.last_sync.is_some(),
                        last_sync_age_ms: h.last_sync.map_or(0, |t| age(t).as_millis() as u64),
                        last_error: h.last_error.clone().unwrap_or_default(),
                    }
                })
                .collect(),
            reconcile_errors: status.reconcile_errors.clone(),
            counters_age_ms: kernel.read_at.map_or(0, |t| t.elapsed().as_millis() as u64),
            model_generation: snap.generation,
            model_age_ms: snap.published.map_or(0, |t| t.elapsed().as_millis() as u64),
            flows_received_total: s.flows.received_total(),
            flows_lagged_total: s.flows.lagged_total(),
        }))
    }

    async fn list_services(
        &self,
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let req = req.into_inner();
        let limit = page_limit(req.limit);
        let after = decode_continue(&req.continue_token)?;
        let snap = self.shared.stores.snapshot.load();
        let (services, continue_token) = services_page(&snap.services, after, limit);
        Ok(Response::new(ListServicesResponse {
            services,
            continue_token,
            total: u32::try_from(snap.services.len()).unwrap_or(u32::MAX),
            model_generation: snap.generation,
        }))
    }

    async fn list_backends(
        &self,
        req: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        let req = req.into_inner();
        let want = (!req.service.is_empty()).then(|| qualified(&req.service));
        let want_name = want.as_deref().and_then(|w| w.split_once('/'));
        let limit = page_limit(req.limit);
        let after = decode_continue(&req.continue_token)?;
        let snap = self.shared.stores.snapshot.load_full();
        // Whole services until the page holds `limit` backends; only their circuits are read
        // from the kernel.
        let mut keys = Vec::new();
        let mut counted = 0;
        let mut continue_token = String::new();
        let mut matching = snap.services.range(after_bound(after)).filter(|(_, a)| {
            want_name.is_none_or(|(ns, name)| a.name.namespace == ns && a.name.name == name)
        });
        for (key, a) in matching.by_ref() {
            keys.push(*key);
            counted += a.spec.backends.len();
            if counted >= limit {
                break;
            }
        }
        if counted >= limit
            && matching.next().is_some()
            && let Some(last) = keys.last()
        {
            continue_token = encode_continue(last);
        }
        if keys.is_empty()
            && after.is_none()
            && let Some(w) = want
        {
            return Err(Status::not_found(format!("no service {w}")));
        }
        let live = self
            .shared
            .datapath
            .backend_status(keys)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let now = monotonic_ns();
        let mut backends = Vec::new();
        for (key, statuses) in live {
            // A service removed between the snapshot and the read has no backends left.
            let Some(a) = snap.services.get(&key) else {
                continue;
            };
            for b in statuses {
                if req.open_only && b.state.circuit == CIRCUIT_CLOSED {
                    continue;
                }
                backends.push(BackendInfo {
                    service: a.name.to_string(),
                    service_address: a.spec.vip.to_string(),
                    address: b.addr.to_string(),
                    id: b.id,
                    weight: b.weight,
                    circuit: match b.state.circuit {
                        CIRCUIT_CLOSED => "closed",
                        CIRCUIT_OPEN => "open",
                        CIRCUIT_HALF_OPEN => "half-open",
                        _ => "unknown",
                    }
                    .to_owned(),
                    active: b.state.active,
                    total: b.state.total,
                    failures: b.state.failures,
                    consecutive_failures: b.state.consecutive_failures,
                    ejections: b.state.ejections,
                    ejected_for_ms: if b.state.circuit == CIRCUIT_CLOSED {
                        0
                    } else {
                        b.state.ejected_until_ns.saturating_sub(now) / 1_000_000
                    },
                });
            }
        }
        Ok(Response::new(ListBackendsResponse {
            backends,
            continue_token,
        }))
    }

    async fn report_backend_result(
        &self,
        req: Request<ReportBackendResultRequest>,
    ) -> Result<Response<ReportBackendResultResponse>, Status> {
        let req = req.into_inner();
        let parse = |field: &str, v: &str| {
            v.parse::<std::net::SocketAddr>().map_err(|e| {
                Status::invalid_argument(format!("{field} {v:?}: {e} (want addr:port)"))
            })
        };
        let vip = parse("service_address", &req.service_address)?;
        let backend = parse("backend_address", &req.backend_address)?;
        // L7 outcomes are about TCP services (HTTP, gRPC).
        let key = crate::datapath::service_key(vip, crate::datapath::spec::Protocol::Tcp);
        let live = self
            .shared
            .datapath
            .backend_status(vec![key])
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let Some(id) = live
            .iter()
            .flat_map(|(_, b)| b)
            .find(|b| b.addr == backend)
            .map(|b| b.id)
        else {
            return Err(Status::not_found(format!(
                "no backend {backend} of service {vip} in the kernel"
            )));
        };
        let dp = &self.shared.datapath;
        let ejected = if req.success {
            dp.report_success(id).await.map(|_| false)
        } else {
            dp.report_failure(id).await
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ReportBackendResultResponse {
            backend_id: id,
            ejected,
        }))
    }

    async fn list_tunnels(
        &self,
        _: Request<ListTunnelsRequest>,
    ) -> Result<Response<ListTunnelsResponse>, Status> {
        let stats = &self.shared.proxy_stats;
        let tunnels = stats
            .tunnels()
            .into_iter()
            .map(|t| proto::TunnelInfo {
                direction: match t.direction {
                    crate::proxy::stats::Direction::Outbound => "outbound",
                    crate::proxy::stats::Direction::Inbound => "inbound",
                }
                .to_owned(),
                peer: t.peer.to_string(),
                source_identity: t.source.to_string(),
                destination_identity: t.destination.to_string(),
                age_seconds: t.age.as_secs(),
                streams_open: t.streams_open,
                streams_total: t.streams_total,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
            })
            .collect();
        let counters = stats
            .counters
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Ok(Response::new(ListTunnelsResponse { tunnels, counters }))
    }

    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let snap = self.shared.stores.snapshot.load();
        let certs: std::collections::HashMap<String, crate::identity::manager::CertStatus> =
            crate::identity::manager::global()
                .map(|m| {
                    m.status()
                        .into_iter()
                        .map(|c| (c.id.to_string(), c))
                        .collect()
                })
                .unwrap_or_default();
        let rfc3339 = |t: Option<std::time::SystemTime>| {
            t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default()
        };
        let identities = snap
            .model
            .pods
            .iter()
            .filter(|(_, p)| p.node == snap.model.node)
            // A pod's identity: its namespace and service account.
            .map(|(name, pod)| (pod, &name.namespace, &pod.service_account))
            .map(|(p, namespace, service_account)| {
                let spiffe_id = format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    snap.mesh.settings.trust_domain, namespace, service_account
                );
                let enrolled = snap.mesh.enrolled.contains_key(&p.name);
                let cert = certs.get(&spiffe_id).filter(|_| enrolled);
                IdentityInfo {
                    namespace: namespace.clone(),
                    pod: p.name.name.clone(),
                    service_account: service_account.clone(),
                    addresses: p.ips.iter().map(ToString::to_string).collect(),
                    serial: cert.and_then(|c| c.serial.clone()).unwrap_or_default(),
                    not_before: rfc3339(cert.and_then(|c| c.not_before)),
                    not_after: rfc3339(cert.and_then(|c| c.not_after)),
                    cert_state: match (crate::identity::manager::global(), cert) {
                        // Only pods in the mesh get certificates (ztunnel: ambient pods only).
                        _ if !enrolled => "not-enrolled".to_owned(),
                        (None, _) => "none".to_owned(),
                        (Some(_), None) => "pending".to_owned(),
                        (Some(_), Some(c)) => c.state.as_str().to_owned(),
                    },
                    spiffe_id,
                }
            })
            .collect();
        Ok(Response::new(ListIdentitiesResponse { identities }))
    }

    async fn config_dump(
        &self,
        _: Request<ConfigDumpRequest>,
    ) -> Result<Response<ConfigDumpResponse>, Status> {
        let snap = self.shared.stores.snapshot.load();
        let services: Vec<serde_json::Value> = snap
            .services
            .values()
            .map(|a| {
                let (name, spec) = (&a.name, &a.spec);
                serde_json::json!({
                    "service": name.to_string(),
                    "address": spec.vip.to_string(),
                    "protocol": format!("{:?}", spec.protocol),
                    "algorithm": algorithm_name(spec.algorithm),
                    "affinityTimeoutSeconds": spec.affinity_timeout.map(|d| d.as_secs()),
                    "circuit": {
                        "maxConnections": spec.circuit.max_connections,
                        "consecutiveFailures": spec.circuit.consecutive_failures,
                        "baseEjectionMs": spec.circuit.base_ejection.as_millis() as u64,
                        "maxEjectionMs": spec.circuit.max_ejection.as_millis() as u64,
                        "maxEjectionPercent": spec.circuit.max_ejection_percent,
                    },
                    "backends": spec.backends.iter().map(|b| serde_json::json!({"address": b.addr.to_string(), "weight": b.weight})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let dump = serde_json::json!({ "config": &self.shared.config, "services": services });
        Ok(Response::new(ConfigDumpResponse {
            json: serde_json::to_string_pretty(&dump).unwrap_or_default(),
        }))
    }

    type WatchFlowsStream = FlowStream;

    async fn list_policies(
        &self,
        _: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let snap = self.shared.stores.snapshot.load();
        let mut response = policies_response(&snap.model);
        security_response(&snap.model, &snap.mesh, &mut response);
        Ok(Response::new(response))
    }

    async fn watch_flows(
        &self,
        req: Request<WatchFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = req.into_inner();
        let filter = FlowFilter::new(&req);
        // Subscribe before reading history so nothing falls between the two.
        let live = req.follow.then(|| self.shared.flows.subscribe());
        Ok(Response::new(flow_stream(&self.shared.flows, filter, live)))
    }
}

/// `WatchFlows`' answer: the kept flows matching `filter`, then, given the subscription `live`
/// taken before, the live ones. Flows published between subscribing and copying the history are
/// in both; the live copy is dropped by seq (Hubble's observer does the same with its ring
/// positions), so a watcher gets each flow once and in seq order.
fn flow_stream(
    flows: &Arc<FlowHub>,
    filter: FlowFilter,
    live: Option<tokio::sync::broadcast::Receiver<Sequenced>>,
) -> FlowStream {
    let instance = flows.instance();
    let recent = flows.recent();
    // Of every kept flow, not only the matching ones: a live flow the filter would pass is
    // a repeat exactly when the history copy held it.
    let history_end = recent.last().map_or(0, |f| f.seq);
    let history: Vec<Result<Flow, Status>> = recent
        .iter()
        .filter(|f| filter.matches(&f.flow))
        .map(|f| Ok(f.to_proto(instance)))
        .collect();
    let history = tokio_stream::iter(history);
    let Some(live) = live else {
        return Box::pin(history);
    };
    let hub = Arc::clone(flows);
    // Text is made here, per watcher and only for the flows it is sent.
    let live = flows
        .follow(history_end, live)
        .filter_map(move |item| match item {
            Followed::Item(f) if filter.matches(&f.flow) => Some(Ok(f.to_proto(instance))),
            Followed::Item(_) => None,
            Followed::Lost(n) => {
                warn!(
                    missed = n,
                    "a flow watcher fell behind past the kept history"
                );
                hub.note_lagged(n);
                None
            }
        });
    Box::pin(history.chain(live))
}

/// Server-side filters of `WatchFlows`, matched against the kept records without making text.
#[derive(Clone)]
struct FlowFilter {
    namespace: String,
    pod: String,
    /// `(namespace, name)`.
    service: Option<(String, String)>,
    verdict: String,
    since_unix_nano: u64,
}

impl FlowFilter {
    fn new(req: &WatchFlowsRequest) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let since_unix_nano = if req.since_seconds == 0 {
            0
        } else {
            now.saturating_sub(Duration::from_secs(req.since_seconds))
                .as_nanos() as u64
        };
        let service = (!req.service.is_empty()).then(|| {
            let q = qualified(&req.service);
            let (ns, name) = q.split_once('/').unwrap_or(("default", q.as_str()));
            (ns.to_owned(), name.to_owned())
        });
        Self {
            namespace: req.namespace.clone(),
            pod: req.pod.clone(),
            service,
            verdict: req.verdict.clone(),
            since_unix_nano,
        }
    }

    fn matches(&self, f: &FlowRecord) -> bool {
        let source = f.source.as_deref();
        let service = f.service.as_deref();
        (self.namespace.is_empty()
            || source.is_some_and(|p| p.namespace == self.namespace)
            || service.is_some_and(|s| s.namespace == self.namespace))
            && (self.pod.is_empty() || source.is_some_and(|p| p.name == self.pod))
            && self.service.as_ref().is_none_or(|(ns, name)| {
                service.is_some_and(|s| s.namespace == *ns && s.name == *name)
            })
            && (self.verdict.is_empty() || f.verdict() == self.verdict)
            && f.time_unix_nano >= self.since_unix_nano
    }
}

/// Enrollment, identity, mode and authorization policies per pod, and every security object's
/// state (issue 9).
fn security_response(
    model: &crate::model::ClusterModel,
    mesh: &crate::authz::MeshView,
    out: &mut ListPoliciesResponse,
) {
    use crate::authz::{ModeSource, NotEnrolled};
    use proto::{SecurityObjectInfo, WorkloadSecurityInfo};
    for name in model.pods.keys() {
        let mut w = WorkloadSecurityInfo {
            pod: name.to_string(),
            ..WorkloadSecurityInfo::default()
        };
        if let Some(p) = mesh.enrolled.get(name) {
            w.enrolled = true;
            w.identity = p.identity.to_string();
            w.mtls_mode = p.mode.to_string();
            w.mode_from = match &p.mode_from {
                ModeSource::Default => "default".to_owned(),
                ModeSource::Workload(n) => format!("workload {n}"),
                ModeSource::Namespace(n) => format!("namespace {n}"),
                ModeSource::Mesh(n) => format!("mesh {n}"),
            };
            w.deny_policies = p.policies.deny.iter().map(|q| q.name.to_string()).collect();
            w.allow_policies = p
                .policies
                .allow
                .iter()
                .map(|q| q.name.to_string())
                .collect();
        } else if let Some(why) = mesh.not_enrolled(model, name) {
            w.not_enrolled = match why {
                NotEnrolled::NotLabelled => "not_labelled".to_owned(),
                NotEnrolled::OptedOut => "opted_out".to_owned(),
                NotEnrolled::HostNetwork => "host_network".to_owned(),
                NotEnrolled::BadIdentity(e) => format!("bad_identity: {e}"),
            };
        }
        out.workloads.push(w);
    }
    out.security = mesh
        .objects
        .iter()
        .map(|((kind, name), st)| SecurityObjectInfo {
            kind: (*kind).to_owned(),
            object: name.to_string(),
            accepted: st.accepted,
            message: st.message.clone(),
            selects: u32::try_from(st.selects).unwrap_or(u32::MAX),
        })
        .collect();
}

/// What applies to each service of `model` and why, and every policy's state.
fn policies_response(model: &crate::model::ClusterModel) -> ListPoliciesResponse {
    use proto::{PolicyInfo, PolicyNotApplied, ServicePolicyInfo};
    let report = &model.policies;
    let services = model
        .services
        .values()
        .map(|svc| {
            let entry = report.services.get(&svc.name);
            let applied = entry.and_then(|e| e.applied.as_ref());
            let c = &svc.settings.circuit;
            ServicePolicyInfo {
                service: svc.name.to_string(),
                policy: applied.map(|(p, _)| p.to_string()).unwrap_or_default(),
                via: applied.map(|(_, k)| k.to_string()).unwrap_or_default(),
                algorithm: algorithm_name(svc.settings.algorithm).to_owned(),
                table_size: svc.settings.table_size.unwrap_or(0),
                max_connections: c.max_connections,
                consecutive_failures: c.consecutive_failures,
                base_ejection_ms: c.base_ejection.as_millis() as u64,
                max_ejection_ms: c.max_ejection.as_millis() as u64,
                max_ejection_percent: c.max_ejection_percent,
                panic_threshold_percent: c.panic_threshold_percent,
                not_applied: entry
                    .map(|e| e.not_applied.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|n| PolicyNotApplied {
                        policy: n.policy.to_string(),
                        reason: n.reason.to_string(),
                        why: n.why.clone(),
                    })
                    .collect(),
                mesh_opt_out: model.mesh.opted_out_services.contains(&svc.name),
            }
        })
        .collect();
    let policies = report
        .policies
        .iter()
        .map(|(name, p)| PolicyInfo {
            policy: name.to_string(),
            accepted: p.accepted,
            reason: p.reason.to_string(),
            message: p.message.clone(),
            targets: p.targets.iter().map(ToString::to_string).collect(),
            services: u32::try_from(p.applies_to).unwrap_or(u32::MAX),
        })
        .collect();
    ListPoliciesResponse {
        services,
        policies,
        ..ListPoliciesResponse::default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::{datapath::service_key, datapath::spec::ServiceSpec, model::ObjectName};

    fn vip(i: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(0x0a60_0000 + i), 80))
    }

    fn insert(services: &mut AppliedServices, i: u32) {
        let spec = ServiceSpec::tcp(vip(i), [SocketAddr::from(([10, 1, 0, 1], 8080))]);
        services.insert(
            service_key(spec.vip, spec.protocol),
            Arc::new(AppliedService {
                name: Arc::new(ObjectName::new("default", format!("svc-{i}"))),
                spec: Arc::new(spec),
            }),
        );
    }

    /// Pages through `services` (`change` runs between pages); the names listed, in order.
    fn list_all(
        services: &mut AppliedServices,
        limit: usize,
        mut change: impl FnMut(&mut AppliedServices, usize),
    ) -> Vec<String> {
        let mut names = Vec::new();
        let mut token = String::new();
        for page in 0.. {
            let after = decode_continue(&token).unwrap();
            let (items, next) = services_page(services, after, limit);
            assert!(items.len() <= limit);
            names.extend(items.into_iter().map(|s| s.name));
            if next.is_empty() {
                break;
            }
            token = next;
            change(services, page);
        }
        names
    }

    #[test]
    fn pages_list_every_service_exactly_once() {
        let mut services = AppliedServices::new();
        (0..1_200).for_each(|i| insert(&mut services, i));
        let mut pages = 0;
        let mut names = list_all(&mut services, DEFAULT_PAGE, |_, _| pages += 1);
        assert_eq!(pages, 2, "1,200 services in pages of 500: three pages");
        // In the kernel key's order (not the names'); each name once.
        names.sort();
        let mut want: Vec<String> = (0..1_200).map(|i| format!("svc-{i}")).collect();
        want.sort();
        assert!(
            names == want,
            "{} listed, not each of the 1,200 once",
            names.len()
        );
        // A page exactly the size of what is left ends the listing without an empty page.
        let (page, next) = services_page(&services, None, 1_200);
        assert_eq!((page.len(), next.as_str()), (1_200, ""));
        assert_eq!(page_limit(0), DEFAULT_PAGE);
        assert_eq!(page_limit(u32::MAX), MAX_PAGE);
    }

    #[test]
    fn a_listing_across_changes_returns_the_stable_services_exactly_once() {
        let mut services = AppliedServices::new();
        // Stable services on even addresses; the changes below touch only odd ones, before and
        // after the position of every page.
        (0..1_200).for_each(|i| insert(&mut services, i * 2));
        let names = list_all(&mut services, 100, |s, page| {
            let page = u32::try_from(page).unwrap();
            for i in 0..30 {
                insert(s, ((page * 97 + i * 41) % 2_400) | 1);
            }
            let odd: Vec<_> = s
                .iter()
                .filter(|(_, a)| {
                    a.name.name["svc-".len()..]
                        .parse::<u32>()
                        .is_ok_and(|i| i % 2 == 1)
                })
                .map(|(k, _)| *k)
                .take(10)
                .collect();
            for k in &odd {
                s.remove(k);
            }
        });
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        for n in &names {
            *seen.entry(n.as_str()).or_default() += 1;
        }
        assert!(seen.values().all(|&n| n == 1), "a service listed twice");
        for i in 0..1_200 {
            assert_eq!(seen.get(format!("svc-{}", i * 2).as_str()), Some(&1));
        }
    }

    #[test]
    fn continue_tokens_round_trip_and_bad_ones_name_the_field() {
        let key = service_key(
            SocketAddr::from(([10, 96, 1, 2], 443)),
            crate::datapath::spec::Protocol::Udp,
        );
        assert_eq!(decode_continue(&encode_continue(&key)).unwrap(), Some(key));
        let v6 = service_key(
            "[fd00::1]:53".parse().unwrap(),
            crate::datapath::spec::Protocol::Tcp,
        );
        assert_eq!(decode_continue(&encode_continue(&v6)).unwrap(), Some(v6));
        assert_eq!(decode_continue("").unwrap(), None);
        for bad in ["v2.00", "v1.xyz", "v1.0000", "garbage"] {
            let e = decode_continue(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("continue_token"), "{}", e.message());
        }
    }

    fn record(time_unix_nano: u64) -> FlowRecord {
        FlowRecord {
            event: mesh_common::event::FlowEvent::default(),
            time_unix_nano,
            source: None,
            service: None,
        }
    }

    #[tokio::test]
    async fn a_watcher_gets_each_flow_once_in_seq_order_though_history_and_live_overlap() {
        let hub = Arc::new(FlowHub::new());
        let filter = FlowFilter::new(&WatchFlowsRequest::default());
        // Flows published between the subscription and the history copy are in both.
        let live = hub.subscribe();
        // Stamped out of time order, as two CPUs' events can be: seq, not time, orders them.
        for t in [30, 10, 20] {
            hub.publish(record(t));
        }
        let mut stream = flow_stream(&hub, filter, Some(live));
        for t in [5, 40] {
            hub.publish(record(t));
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            let f = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("a flow")
                .expect("the stream goes on")
                .expect("not an error");
            assert_eq!(f.instance, hub.instance());
            got.push((f.seq, f.time_unix_nano));
        }
        assert_eq!(got, [(1, 30), (2, 10), (3, 20), (4, 5), (5, 40)]);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), stream.next())
                .await
                .is_err(),
            "the live copies of the history's flows were sent again"
        );
        assert_ne!(hub.instance(), 0);
        assert_ne!(
            hub.instance(),
            FlowHub::new().instance(),
            "each process numbers its own stream"
        );
    }
}
