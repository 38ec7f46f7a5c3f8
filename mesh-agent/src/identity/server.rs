//! The CA's gRPC service on 15012 (`mesh-agent ca`): authenticates the node, authorizes the pod,
//! checks the CSR and signs. Every refusal is logged with node and identity, counted, and
//! answered with the gRPC code and the reason (as istiod does).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    SpiffeId,
    auth::{self, Caller, NodeAuth, Refusal},
    ca::CertificateAuthority,
    csr,
    pb::{
        CreateCertificateRequest, CreateCertificateResponse,
        certificate_service_server::{CertificateService, CertificateServiceServer},
    },
    tls,
};
use crate::model::ObjectName;

/// The CA's port (istiod's).
pub const DEFAULT_CA_PORT: u16 = 15012;
/// Lifetime of the CA's own serving certificate; it is re-issued at every start.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_hours(365 * 24);
/// Most concurrent TLS handshakes in progress (a flood of slow clients cannot exhaust memory).
const MAX_HANDSHAKES: usize = 256;

/// What the CA did, for its metrics and the tests.
#[derive(Debug, Default)]
pub struct CaCounters {
    pub signed: AtomicU64,
    /// Bad or missing credential (`UNAUTHENTICATED`).
    pub unauthenticated: AtomicU64,
    /// Pod not on the node, wrong service account, unknown pod (`PERMISSION_DENIED`).
    pub denied: AtomicU64,
    /// Malformed request or CSR (`INVALID_ARGUMENT`).
    pub invalid: AtomicU64,
    /// The API or static file could not be read (`UNAVAILABLE`).
    pub unavailable: AtomicU64,
}

impl CaCounters {
    /// Prometheus text.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP kernmesh_ca_requests_total Certificate requests by outcome.\n# TYPE kernmesh_ca_requests_total counter\n",
        );
        for (outcome, c) in [
            ("signed", &self.signed),
            ("unauthenticated", &self.unauthenticated),
            ("denied", &self.denied),
            ("invalid", &self.invalid),
            ("unavailable", &self.unavailable),
        ] {
            let _ = writeln!(
                out,
                "kernmesh_ca_requests_total{{outcome=\"{outcome}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The gRPC service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: NodeAuth,
    counters: Arc<CaCounters>,
}

impl CaService {
    #[must_use]
    pub fn new(ca: Arc<CertificateAuthority>, auth: NodeAuth, counters: Arc<CaCounters>) -> Self {
        Self { ca, auth, counters }
    }

    fn refuse(counter: &AtomicU64, status: Status, node: &str, id: &str) -> Status {
        counter.fetch_add(1, Ordering::Relaxed);
        warn!(node, identity = id, code = ?status.code(), reason = status.message(), "certificate refused");
        status
    }
}

fn bearer(req: &Request<CreateCertificateRequest>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let token = v.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let token = bearer(&req);
        let r = req.into_inner();
        let id_text = r.spiffe_id.clone();
        let Some(token) = token else {
            return Err(Self::refuse(
                &self.counters.unauthenticated,
                Status::unauthenticated("no bearer token in the authorization metadata"),
                "-",
                &id_text,
            ));
        };
        let caller = match self.auth.authenticate(&token).await {
            Ok(c) => c,
            Err(e) => {
                return Err(Self::refuse(
                    &self.counters.unauthenticated,
                    Status::unauthenticated(e.0),
                    "-",
                    &id_text,
                ));
            }
        };
        // Who asked, for the logs: the node's name, or `relay <namespace>/<name>`.
        let node = caller.to_string();
        let invalid = |msg: String| {
            Self::refuse(
                &self.counters.invalid,
                Status::invalid_argument(msg),
                &node,
                &id_text,
            )
        };
        let id: SpiffeId = r
            .spiffe_id
            .parse()
            .map_err(|e| invalid(format!("spiffe_id {:?}: {e}", r.spiffe_id)))?;
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Self::refuse(
                &self.counters.denied,
                Status::permission_denied(format!(
                    "trust domain {} is not this CA's {}",
                    id.trust_domain(),
                    self.ca.trust_domain()
                )),
                &node,
                &id_text,
            ));
        }
        let pod = ObjectName::new(&r.pod_namespace, &r.pod_name);
        let decision = match &caller {
            // The relay is authorized by its token alone (its pod fields are only logged).
            Caller::Relay(account) => auth::authorize_relay(account, self.ca.trust_domain(), &id),
            Caller::Node(node) => {
                if r.pod_namespace.is_empty() || r.pod_name.is_empty() {
                    return Err(invalid(
                        "pod_namespace and pod_name are required".to_owned(),
                    ));
                }
                self.auth.authorize(node, &pod, &id).await
            }
        };
        match decision {
            Ok(()) => {}
            Err(Refusal::Denied(reason)) => {
                return Err(Self::refuse(
                    &self.counters.denied,
                    Status::permission_denied(reason),
                    &node,
                    &id_text,
                ));
            }
            Err(Refusal::Unavailable(reason)) => {
                return Err(Self::refuse(
                    &self.counters.unavailable,
                    Status::unavailable(reason),
                    &node,
                    &id_text,
                ));
            }
        }
        let checked = csr::check(&r.csr, &id).map_err(|e| invalid(e.to_string()))?;
        let requested = (r.validity_seconds > 0).then(|| Duration::from_secs(r.validity_seconds));
        let issued = self.ca.sign(&checked, &id, requested).map_err(|e| {
            warn!(node, identity = id_text, error = %e, "signing failed");
            Status::internal(format!("signing failed: {e}"))
        })?;
        self.counters.signed.fetch_add(1, Ordering::Relaxed);
        info!(node, identity = id_text, pod = %pod, serial = issued.serial, "certificate signed");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            roots: self.ca.roots().iter().map(|c| c.to_vec()).collect(),
        }))
    }
}

/// A running CA server.
pub struct CaServer {
    pub addr: SocketAddr,
    pub counters: Arc<CaCounters>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The accept loop (owns the listener): aborted with the server so the port is released.
    accept: tokio::task::JoinHandle<()>,
}

impl CaServer {
    /// Binds `listen`, issues the serving certificate for `server_names` and serves until
    /// [`CaServer::shutdown`] or drop.
    pub async fn start(
        listen: SocketAddr,
        ca: Arc<CertificateAuthority>,
        auth: NodeAuth,
        server_names: &[String],
    ) -> Result<Self, ServeError> {
        let (chain, key) = ca
            .serving_cert(server_names, SERVING_CERT_LIFETIME)
            .map_err(|e| ServeError(format!("serving certificate: {e}")))?;
        let config = tls::server_config(chain, key.serialize_der())
            .map_err(|e| ServeError(format!("TLS configuration: {e}")))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| ServeError(format!("binding {listen}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError(format!("{listen}: {e}")))?;
        let counters = Arc::new(CaCounters::default());
        let service = CaService::new(ca, auth, Arc::clone(&counters));
        let (conns_tx, conns_rx) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        // Handshakes run in their own tasks so one slow client cannot stall accepting others;
        // a failed handshake (plaintext, wrong version) is logged and dropped.
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = conns_tx.clone();
                tokio::spawn(async move {
                    let hs =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    drop(permit);
                    match hs {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls::ServerIo(tls))).await;
                        }
                        Ok(Err(e)) => warn!(%peer, error = %e, "CA TLS handshake failed"),
                        Err(_) => warn!(%peer, "CA TLS handshake timed out"),
                    }
                });
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CertificateServiceServer::new(service))
                .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), async {
                    let _ = rx.await;
                })
                .await
        });
        info!(%addr, "CA serving");
        Ok(Self {
            addr,
            counters,
            shutdown: Some(tx),
            task,
            accept,
        })
    }

    /// Stops accepting (the port is released at once), tells every connection to go away
    /// (HTTP/2 GOAWAY) and waits for them to end.
    pub async fn shutdown(mut self) {
        self.accept.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server ends by itself (an error).
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError(e.to_string())),
            Err(e) => Err(ServeError(e.to_string())),
        }
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.task.abort();
    }
}

/// The CA server could not start or stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CA server: {0}")]
pub struct ServeError(pub String);
