//! The admin API: tonic gRPC on a Unix socket only root can open (`meshctl` is the client).
//! Every call but `ListBackends` answers from the published snapshots and never waits for a
//! reconciliation; `ListBackends` reads live circuit state through the data-path owner.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper_util::rt::TokioIo;
use mesh_common::backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN};
use tokio_stream::{
    Stream, StreamExt as _,
    wrappers::{BroadcastStream, UnixListenerStream},
};
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint, Uri},
};
use tracing::{info, warn};

use crate::{
    app::Shared,
    config::{Source, algorithm_name},
    flows::monotonic_ns,
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
    ServiceInfo, SourceStatus, StatusRequest, StatusResponse, WatchFlowsRequest,
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

/// Default SPIFFE trust domain (Istio's).
pub const TRUST_DOMAIN: &str = "cluster.local";

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

struct AdminService {
    shared: Arc<Shared>,
}

/// `name` or `namespace/name` → `namespace/name`.
fn qualified(service: &str) -> String {
    if service.contains('/') {
        service.to_owned()
    } else {
        format!("default/{service}")
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
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let snap = self.shared.stores.snapshot.load();
        let services = snap
            .services
            .values()
            .map(|a| {
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
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn list_backends(
        &self,
        req: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        let req = req.into_inner();
        let want = (!req.service.is_empty()).then(|| qualified(&req.service));
        let snap = self.shared.stores.snapshot.load_full();
        let keys: Vec<_> = snap
            .services
            .iter()
            .filter(|(_, a)| want.as_ref().is_none_or(|w| *w == a.name.to_string()))
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty()
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
        Ok(Response::new(ListBackendsResponse { backends }))
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
            .filter_map(|(name, p)| Some((p, snap.identities.get(name)?)))
            .map(|(p, id)| {
                let spiffe_id = format!(
                    "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
                    id.namespace, id.service_account
                );
                let cert = certs.get(&spiffe_id);
                IdentityInfo {
                    namespace: id.namespace.clone(),
                    pod: p.name.name.clone(),
                    service_account: id.service_account.clone(),
                    addresses: p.ips.iter().map(ToString::to_string).collect(),
                    serial: cert.and_then(|c| c.serial.clone()).unwrap_or_default(),
                    not_before: rfc3339(cert.and_then(|c| c.not_before)),
                    not_after: rfc3339(cert.and_then(|c| c.not_after)),
                    cert_state: match (crate::identity::manager::global(), cert) {
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
        Ok(Response::new(policies_response(&snap.model)))
    }

    async fn watch_flows(
        &self,
        req: Request<WatchFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = req.into_inner();
        let filter = FlowFilter::new(&req);
        // Subscribe before reading history so nothing falls between the two.
        let live = self.shared.flows.subscribe();
        let history: Vec<Result<Flow, Status>> = self
            .shared
            .flows
            .recent()
            .into_iter()
            .filter(|f| filter.matches(f))
            .map(Ok)
            .collect();
        let history = tokio_stream::iter(history);
        if !req.follow {
            return Ok(Response::new(Box::pin(history)));
        }
        let flows = Arc::clone(&self.shared.flows);
        let live = BroadcastStream::new(live).filter_map(move |item| match item {
            Ok(f) if filter.matches(&f) => Some(Ok(f)),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                warn!(missed = n, "a flow watcher fell behind");
                flows.note_lagged(n);
                None
            }
        });
        Ok(Response::new(Box::pin(history.chain(live))))
    }
}

/// Server-side filters of `WatchFlows`.
#[derive(Clone)]
struct FlowFilter {
    namespace: String,
    pod: String,
    service: String,
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
        Self {
            namespace: req.namespace.clone(),
            pod: req.pod.clone(),
            service: if req.service.is_empty() {
                String::new()
            } else {
                qualified(&req.service)
            },
            verdict: req.verdict.clone(),
            since_unix_nano,
        }
    }

    fn matches(&self, f: &Flow) -> bool {
        (self.namespace.is_empty()
            || f.source_namespace == self.namespace
            || f.service.starts_with(&format!("{}/", self.namespace)))
            && (self.pod.is_empty() || f.source_pod == self.pod)
            && (self.service.is_empty() || f.service == self.service)
            && (self.verdict.is_empty() || f.verdict == self.verdict)
            && f.time_unix_nano >= self.since_unix_nano
    }
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
    ListPoliciesResponse { services, policies }
}
