//! The admin API: tonic gRPC on a Unix socket only root can open (`meshctl` is the client).

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_common::backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN};
use tokio_stream::{
    Stream, StreamExt as _,
    wrappers::{BroadcastStream, UnixListenerStream},
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{app::Shared, datapath::spec::Algorithm, flows::monotonic_ns};

/// Generated from `proto/admin.proto`.
#[expect(clippy::pedantic, missing_docs, reason = "generated code")]
pub mod proto {
    tonic::include_proto!("mesh.admin.v1");
}

use proto::{
    BackendInfo, ConfigDumpRequest, ConfigDumpResponse, Flow, IdentityInfo, ListBackendsRequest,
    ListBackendsResponse, ListIdentitiesRequest, ListIdentitiesResponse, ListPoliciesRequest,
    ListPoliciesResponse, ListServicesRequest, ListServicesResponse, ServiceInfo, StatusRequest,
    StatusResponse, WatchFlowsRequest,
    admin_server::{Admin, AdminServer},
};

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

fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Random => "random",
        Algorithm::RoundRobin => "round-robin",
        Algorithm::Weighted => "weighted",
        Algorithm::Maglev => "maglev",
        Algorithm::LeastConn => "least-connections",
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

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.shared;
        let st = s.state();
        let counters: HashMap<String, u64> = st
            .dp
            .counters()
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let backends = st
            .reconciler
            .applied()
            .map(|(_, (_, spec))| spec.backends.len() as u32)
            .sum();
        Ok(Response::new(StatusResponse {
            node: s.config.node.clone(),
            source: match &s.config.source {
                crate::app::Source::File(p) => format!("file {}", p.display()),
                crate::app::Source::Kubernetes => "kubernetes".to_owned(),
            },
            ready: st.ready,
            uptime_seconds: s.started.elapsed().as_secs(),
            services: st.reconciler.applied().count() as u32,
            backends,
            last_rejection: st.last_rejection.clone().unwrap_or_default(),
            pin_dir: s.config.pin_dir.display().to_string(),
            cgroup: s.config.cgroup.display().to_string(),
            counters,
            map_full_total: st.dp.map_full_total(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let st = self.shared.state();
        let services = st
            .reconciler
            .applied()
            .map(|(_, (name, spec))| ServiceInfo {
                namespace: name.namespace.clone(),
                name: name.name.clone(),
                address: spec.vip.to_string(),
                protocol: format!("{:?}", spec.protocol).to_uppercase(),
                algorithm: algorithm_name(spec.algorithm).to_owned(),
                backends: spec.backends.len() as u32,
                max_connections: spec.circuit.max_connections,
                consecutive_failures: spec.circuit.consecutive_failures,
                base_ejection_ms: spec.circuit.base_ejection.as_millis() as u64,
                max_ejection_percent: spec.circuit.max_ejection_percent,
                affinity_timeout_seconds: spec.affinity_timeout.map_or(0, |d| d.as_secs()),
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
        let st = self.shared.state();
        let now = monotonic_ns();
        let mut backends = Vec::new();
        let mut found = want.is_none();
        for (key, (name, spec)) in st.reconciler.applied() {
            if want.as_ref().is_some_and(|w| *w != name.to_string()) {
                continue;
            }
            found = true;
            for b in st
                .dp
                .backend_status(key)
                .map_err(|e| Status::internal(e.to_string()))?
            {
                if req.open_only && b.state.circuit == CIRCUIT_CLOSED {
                    continue;
                }
                backends.push(BackendInfo {
                    service: name.to_string(),
                    service_address: spec.vip.to_string(),
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
        if !found {
            return Err(Status::not_found(format!(
                "no service {}",
                want.unwrap_or_default()
            )));
        }
        Ok(Response::new(ListBackendsResponse { backends }))
    }

    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let st = self.shared.state();
        let identities = st
            .model
            .pods
            .values()
            .filter(|p| p.node == st.model.node)
            .map(|p| IdentityInfo {
                namespace: p.name.namespace.clone(),
                pod: p.name.name.clone(),
                service_account: p.service_account.clone(),
                spiffe_id: format!(
                    "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
                    p.name.namespace, p.service_account
                ),
                addresses: p.ips.iter().map(ToString::to_string).collect(),
            })
            .collect();
        Ok(Response::new(ListIdentitiesResponse { identities }))
    }

    async fn config_dump(
        &self,
        _: Request<ConfigDumpRequest>,
    ) -> Result<Response<ConfigDumpResponse>, Status> {
        let st = self.shared.state();
        let services: Vec<serde_json::Value> = st
            .reconciler
            .applied()
            .map(|(_, (name, spec))| {
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
        let st = self.shared.state();
        Ok(Response::new(policies_response(&st.model)))
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
        let live = BroadcastStream::new(live).filter_map(move |item| match item {
            Ok(f) if filter.matches(&f) => Some(Ok(f)),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                warn!(missed = n, "a flow watcher fell behind");
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
