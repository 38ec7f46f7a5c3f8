//! The relay (`mesh-agent relay`, Hubble Relay's role): gathers flows from every agent over the
//! admin flow API on mTLS, serves them merged on the same `WatchFlows` API, and a live map page.

pub mod flow_api;
pub mod graph;
pub mod tls;
mod web;

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::admin::proto::{
    ConfigDumpRequest, ConfigDumpResponse, Flow, ListBackendsRequest, ListBackendsResponse,
    ListIdentitiesRequest, ListIdentitiesResponse, ListPoliciesRequest, ListPoliciesResponse,
    ListServicesRequest, ListServicesResponse, ListTunnelsRequest, ListTunnelsResponse,
    SourceStatus, StatusRequest, StatusResponse, WatchFlowsRequest,
    admin_client::AdminClient,
    admin_server::{Admin, AdminServer},
};
use crate::flows::{Followed, SeqRing};

/// Hubble Relay's port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4245";
/// Hubble UI's port.
pub const DEFAULT_WEB_LISTEN: &str = "0.0.0.0:8081";
/// Flows the relay keeps for history queries and the map (Hubble Relay keeps none itself and asks
/// each agent's ring; we keep the merged recent ones so the map costs the agents nothing).
pub const RECENT_CAPACITY: usize = 50_000;

/// `mesh-agent relay`.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// The agents' flow APIs (`host:port`, comma-separated; port 4244 when omitted).
    #[arg(long, value_delimiter = ',', required_unless_present = "agent_pods")]
    pub agents: Vec<String>,
    /// Kubernetes: follow the running agent pods `namespace/label-selector` (e.g.
    /// `mesh-system/app.kubernetes.io/name=mesh-agent`), watched as they come and go, on their
    /// pod IP and --agent-port (Hubble Relay finds agents through its peer service instead).
    #[arg(long, conflicts_with = "agents")]
    pub agent_pods: Option<String>,
    /// The agents' flow API port (with --agent-pods).
    #[arg(long, default_value_t = flow_api::DEFAULT_PORT)]
    pub agent_port: u16,
    /// File mode without --agent-id: the name every agent's flow API certificate carries.
    #[arg(long, default_value = tls::DEFAULT_SERVER_NAME)]
    pub agent_server_name: String,
    /// The SPIFFE id (URI SAN) every agent's flow API certificate must carry. Mesh CA mode:
    /// default `spiffe://<trust domain>/ns/mesh-system/sa/mesh-agent`; file mode: checked
    /// instead of --agent-server-name when set.
    #[arg(long, env = "MESH_RELAY_AGENT_ID")]
    pub agent_id: Option<String>,
    /// File mode: the relay's client certificate, key, and the roots agents' certificates chain
    /// to (cert-manager's Secret layout).
    #[command(flatten)]
    pub tls: tls::TlsFiles,
    /// Mesh CA mode: the CA and the relay's credential for it (its own projected service-account
    /// token for the CA's audience, reviewed by the CA's `TokenReview`).
    #[command(flatten)]
    pub ca: crate::identity::cli::AgentCaArgs,
    /// Mesh CA mode: the trust domain of the relay's and the agents' ids.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Mesh CA mode: the relay's own id, asked of the CA (default
    /// `spiffe://<trust domain>/ns/mesh-system/sa/mesh-relay`; the CA gives this account
    /// nothing else).
    #[arg(long, env = "MESH_RELAY_ID")]
    pub relay_id: Option<String>,
    /// Mesh CA mode: the relay's pod (downward API), named in its certificate requests.
    #[arg(long, env = "POD_NAME", default_value = "mesh-relay")]
    pub pod_name: String,
    /// `WatchFlows`/`Status` for `meshctl --server` (plaintext gRPC, as Hubble Relay without
    /// its optional TLS: reach it through the cluster network or a port-forward).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The live map page (`/`) and its data (`/api/map?window=60`); `none` to disable.
    #[arg(long, default_value = DEFAULT_WEB_LISTEN)]
    pub web_listen: String,
}

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Id(#[from] flow_api::FlowApiError),
    #[error(
        "the relay needs its certificate from the mesh CA (--ca-address, --ca-root-file, --ca-token-file) or from files (--tls-cert, --tls-key, --tls-ca), not both"
    )]
    Credentials,
    #[error("mesh CA: {0}")]
    Ca(String),
    #[error("--agent-server-name {0:?}: not a DNS name or IP address")]
    ServerName(String),
    #[error("--web-listen {0:?}: not an address or `none`")]
    WebListen(String),
    #[error("--agent-pods {0:?}: expected namespace/label-selector")]
    AgentPods(String),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// One agent as the relay sees it.
#[derive(Clone, Debug, Default)]
struct AgentState {
    address: String,
    node: String,
    connected: bool,
    last_error: String,
    reconnects: u32,
    connected_at: Option<Instant>,
    /// Flows missing from the agent's numbering (gaps in seq): it dropped them before they
    /// reached the relay (a watcher that fell behind, or history overwritten during a long
    /// disconnect).
    missed: u64,
}

/// Where the relay is in one agent's stream: the agent process (instance) and the last seq
/// taken from it. Kept across reconnects, so the history an agent replays is skipped and only
/// what is new is taken (Hubble Relay merges its agents' streams by time through a sort
/// buffer; a per-agent number needs no buffer and does not depend on clocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    instance: u64,
    seq: u64,
    /// For agents without numbering (seq 0, older than the field): the last time taken.
    time: u64,
}

/// What [`Position::admit`] decided about one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admit {
    /// New: `missed` flows of the numbering were never received before it.
    New { missed: u64 },
    /// Taken already (the replayed history after a reconnect).
    Repeat,
    /// The first flow of another agent process (a restart: its numbering starts again).
    Restarted,
}

impl Position {
    fn admit(&mut self, f: &Flow) -> Admit {
        if f.seq == 0 {
            // An older agent: by time, as before (loses flows stamped out of order).
            if f.time_unix_nano <= self.time {
                return Admit::Repeat;
            }
            self.time = f.time_unix_nano;
            return Admit::New { missed: 0 };
        }
        if f.instance != self.instance {
            let first = self.instance == 0 && self.seq == 0;
            self.instance = f.instance;
            self.seq = f.seq;
            // The first contact starts wherever the agent's history starts.
            return if first {
                Admit::New { missed: 0 }
            } else {
                Admit::Restarted
            };
        }
        if f.seq <= self.seq {
            return Admit::Repeat;
        }
        let missed = f.seq - self.seq - 1;
        self.seq = f.seq;
        Admit::New { missed }
    }
}

/// Merged recent flows, live subscribers and the agents' states.
pub struct Hub {
    /// The kept flows, numbered in the relay's own merged stream (the agents' seqs are per
    /// agent; one task per agent publishes), and their live broadcast.
    ring: Arc<SeqRing<Flow>>,
    /// By address; a Kubernetes agent pod that went away is dropped with its task.
    agents: Mutex<std::collections::BTreeMap<String, AgentState>>,
    started: Instant,
}

impl Hub {
    fn new() -> Self {
        Self {
            ring: Arc::new(SeqRing::new(RECENT_CAPACITY)),
            agents: Mutex::new(std::collections::BTreeMap::new()),
            started: Instant::now(),
        }
    }

    /// Keeps a flow and sends it to live watchers ([`SeqRing::publish`]).
    fn publish(&self, flow: Flow) {
        self.ring.publish(flow);
    }

    /// Recent flows in time order (agents' streams interleave on arrival), and the merged
    /// number of the last one kept.
    fn recent_numbered(&self) -> (Vec<Flow>, u64) {
        let recent = self.ring.recent();
        let last = recent.last().map_or(0, |f| f.seq);
        let mut v: Vec<Flow> = recent.into_iter().map(|f| f.flow).collect();
        v.sort_by_key(|f| f.time_unix_nano);
        (v, last)
    }

    /// Recent flows in time order.
    fn recent(&self) -> Vec<Flow> {
        self.recent_numbered().0
    }

    fn agent(&self, addr: &str, f: impl FnOnce(&mut AgentState)) {
        if let Some(a) = self
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(addr)
        {
            f(a);
        }
    }

    /// The graph of the flows newer than `window`.
    pub fn graph(&self, window: Duration) -> graph::Graph {
        let since = unix_nanos().saturating_sub(window.as_nanos() as u64);
        let flows: Vec<Flow> = self
            .recent()
            .into_iter()
            .filter(|f| f.time_unix_nano >= since)
            .collect();
        graph::build(&flows, window.as_secs_f64())
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs the relay until the process ends.
pub async fn run(args: RelayArgs) -> Result<(), RelayError> {
    let client = Arc::new(client_config(&args)?);
    let name = ServerName::try_from(args.agent_server_name.clone())
        .map_err(|_| RelayError::ServerName(args.agent_server_name.clone()))?;
    let web: Option<SocketAddr> = match args.web_listen.as_str() {
        "none" => None,
        s => Some(s.parse().map_err(|_| RelayError::WebListen(s.to_owned()))?),
    };
    let hub = Arc::new(Hub::new());
    let followers = Followers {
        hub: Arc::clone(&hub),
        name,
        config: client,
        tasks: std::collections::BTreeMap::new(),
    };
    if let Some(pods) = &args.agent_pods {
        let (namespace, selector) = pods
            .split_once('/')
            .filter(|(ns, sel)| !ns.is_empty() && !sel.is_empty())
            .ok_or_else(|| RelayError::AgentPods(pods.clone()))?;
        let kube = kube::Client::try_default().await?;
        tokio::spawn(watch_agent_pods(
            kube,
            namespace.to_owned(),
            selector.to_owned(),
            args.agent_port,
            followers,
        ));
    } else {
        // A static set: dropping the abort handles afterwards leaves the tasks running.
        let mut followers = followers;
        followers.set(
            args.agents
                .iter()
                .map(|a| with_port(a, args.agent_port))
                .collect(),
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RelayError::Listen {
            addr: args.listen,
            source,
        })?;
    if let Some(addr) = web {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::Listen { addr, source })?;
        info!(%addr, "relay map page listening");
        tokio::spawn(web::serve(listener, Arc::clone(&hub)));
    }
    info!(addr = %args.listen, "relay listening");
    let result = tonic::transport::Server::builder()
        .add_service(AdminServer::new(RelayService { hub }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await;
    if let Err(e) = result {
        warn!(error = %e, "relay API stopped");
    }
    Ok(())
}

/// The relay's TLS client: its certificate from the mesh CA (renewed, asked for at every
/// connect) checking the agents' id, or from files checking the agents' id or name.
fn client_config(args: &RelayArgs) -> Result<rustls::ClientConfig, RelayError> {
    let files = args.tls.credentials()?;
    let parse_agent_id = |td: &str| {
        flow_api::id_or_default(
            "--agent-id",
            args.agent_id.as_deref(),
            td,
            tls::DEFAULT_AGENT_ACCOUNT,
        )
    };
    match (files, &args.ca.ca_address) {
        (Some(files), None) => {
            let agent_id = match &args.agent_id {
                Some(id) => Some(id.parse().map_err(|source| flow_api::FlowApiError::Id {
                    flag: "--agent-id",
                    value: id.clone(),
                    source,
                })?),
                None => None,
            };
            Ok(tls::client_config(Arc::new(files), agent_id)?)
        }
        (None, Some(_)) => {
            let td = &args.trust_domain;
            let own = flow_api::id_or_default(
                "--relay-id",
                args.relay_id.as_deref(),
                td,
                tls::DEFAULT_RELAY_ACCOUNT,
            )?;
            let agent_id = parse_agent_id(td)?;
            if let Some(root) = &args.ca.ca_root_file
                && !root.exists()
            {
                // Not the agents' "run without mTLS": the relay has nothing to do without it,
                // so it fails and its restart picks the bundle up once the CA published it.
                return Err(RelayError::Ca(format!(
                    "--ca-root-file {}: does not exist (has the CA published its bundle?)",
                    root.display()
                )));
            }
            let manager = args
                .ca
                .manager(td)
                .map_err(|e| RelayError::Ca(e.to_string()))?
                .ok_or_else(|| RelayError::Ca("--ca-address is not set".to_owned()))?;
            let pod = crate::model::ObjectName::new(own.namespace(), &args.pod_name);
            manager.set_workloads(&std::collections::BTreeMap::from([(pod, own.clone())]));
            info!(identity = %own, agents = %agent_id, "relay certificate from the mesh CA");
            Ok(tls::client_config(
                Arc::new(tls::CaCredentials::new(manager, own)),
                Some(agent_id),
            )?)
        }
        _ => Err(RelayError::Credentials),
    }
}

/// Serves `service` on `addr` with TLS `config` (the agent's flow API).
pub(crate) async fn serve_tls<S>(
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    service: S,
    what: &'static str,
) where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "{what} not served");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) =
        tokio::sync::mpsc::channel::<std::io::Result<crate::identity::tls::ServerIo>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            // Handshakes run apart so one slow or failing peer never blocks the others.
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(crate::identity::tls::ServerIo(tls))).await;
                    }
                    Ok(Err(e)) => warn!(%peer, error = %e, "{what}: TLS handshake refused"),
                    Err(_) => warn!(%peer, "{what}: TLS handshake timed out"),
                }
            });
        }
    });
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    if let Err(e) = result {
        warn!(error = %e, "{what} stopped");
    }
}

/// An mTLS channel to one agent.
fn agent_channel(
    addr: &str,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let target = addr.to_owned();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("agent address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30));
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = Arc::clone(&config);
        let name = name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// `host` → `host:port`; `host:port` and `[v6]:port` kept.
fn with_port(a: &str, port: u16) -> String {
    let has_port = a
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')));
    if has_port {
        a.to_owned()
    } else if a.contains(':') && !a.starts_with('[') {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    }
}

/// The agents followed now: one task each, started and stopped as the set changes.
struct Followers {
    hub: Arc<Hub>,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    tasks: std::collections::BTreeMap<String, tokio::task::AbortHandle>,
}

impl Followers {
    /// Follows exactly `addresses`: new ones start, gone ones stop (their flows stay kept).
    fn set(&mut self, addresses: std::collections::BTreeSet<String>) {
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|a| !addresses.contains(*a))
            .cloned()
            .collect();
        let mut agents = self
            .hub
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for addr in gone {
            if let Some(t) = self.tasks.remove(&addr) {
                t.abort();
            }
            agents.remove(&addr);
            info!(agent = %addr, "agent gone: no longer followed");
        }
        for addr in addresses {
            if self.tasks.contains_key(&addr) {
                continue;
            }
            agents.insert(
                addr.clone(),
                AgentState {
                    address: addr.clone(),
                    ..AgentState::default()
                },
            );
            let task = tokio::spawn(follow_agent(
                Arc::clone(&self.hub),
                addr.clone(),
                self.name.clone(),
                Arc::clone(&self.config),
            ));
            self.tasks.insert(addr, task.abort_handle());
        }
    }
}

/// Follows the running agent pods matching `selector` in `namespace` (a pod counts once it has
/// an IP and is not terminating), as a watch: a restart or a new node is picked up at once.
async fn watch_agent_pods(
    kube: kube::Client,
    namespace: String,
    selector: String,
    port: u16,
    mut followers: Followers,
) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let api: kube::Api<Pod> = kube::Api::namespaced(kube, &namespace);
    let address = |p: &Pod| -> Option<(String, String)> {
        let name = p.metadata.name.clone()?;
        if p.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let ip = p.status.as_ref()?.pod_ip.clone()?;
        Some((name, with_port(&ip, port)))
    };
    let mut pods: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut relisting: Option<std::collections::BTreeMap<String, String>> = None;
    let stream = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => relisting = Some(std::collections::BTreeMap::new()),
            Ok(watcher::Event::InitApply(p)) => {
                if let (Some(r), Some((n, a))) = (relisting.as_mut(), address(&p)) {
                    r.insert(n, a);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => pods = relisting.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(p)) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                match address(&p) {
                    Some((n, a)) => pods.insert(n, a),
                    None => pods.remove(&name),
                };
            }
            Ok(watcher::Event::Delete(p)) => {
                pods.remove(&p.metadata.name.clone().unwrap_or_default());
            }
            Err(e) => {
                warn!(%namespace, %selector, error = %e, "agent pod watch failed (retrying)");
                continue;
            }
        }
        followers.set(pods.values().cloned().collect());
    }
}

/// Follows one agent's flows forever, reconnecting with backoff. After a reconnect the agent
/// sends its history again: flows the relay took already (by the agent's seq) are skipped.
async fn follow_agent(
    hub: Arc<Hub>,
    addr: String,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) {
    let mut position = Position::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        let Err(error) = stream_agent(&hub, &addr, &name, &config, &mut position).await;
        let was_connected = hub
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
            .is_some_and(|a| a.connected);
        if was_connected {
            backoff = Duration::from_millis(200);
        }
        warn!(agent = %addr, %error, retry_in = ?backoff, "agent flow stream down");
        hub.agent(&addr, |a| {
            a.connected = false;
            a.last_error.clone_from(&error);
            a.reconnects += 1;
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// A status with its causes (a failed handshake says why, not just "transport error").
fn describe(e: &Status) -> String {
    let mut s = e.message().to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// One connection to an agent: its node name, then its flows until the stream breaks.
async fn stream_agent(
    hub: &Hub,
    addr: &str,
    name: &ServerName<'static>,
    config: &Arc<rustls::ClientConfig>,
    position: &mut Position,
) -> Result<std::convert::Infallible, String> {
    let channel = agent_channel(addr, name.clone(), Arc::clone(config))?;
    let mut client = AdminClient::new(channel);
    let node = client
        .status(StatusRequest {})
        .await
        .map_err(|e| describe(&e))?
        .into_inner()
        .node;
    let mut stream = client
        .watch_flows(WatchFlowsRequest {
            follow: true,
            ..WatchFlowsRequest::default()
        })
        .await
        .map_err(|e| describe(&e))?
        .into_inner();
    hub.agent(addr, |a| {
        a.node.clone_from(&node);
        a.connected = true;
        a.connected_at = Some(Instant::now());
    });
    info!(agent = %addr, %node, "following the agent's flows");
    loop {
        match stream.message().await {
            Ok(Some(mut f)) => {
                match position.admit(&f) {
                    Admit::Repeat => continue,
                    Admit::New { missed: 0 } => {}
                    Admit::New { missed } => {
                        warn!(agent = %addr, %node, missed, "the agent dropped flows before sending them");
                        hub.agent(addr, |a| a.missed += missed);
                    }
                    Admit::Restarted => {
                        info!(agent = %addr, %node, "the agent restarted: following its new numbering");
                    }
                }
                f.node.clone_from(&node);
                hub.publish(f);
            }
            Ok(None) => return Err("the agent ended the stream".to_owned()),
            Err(e) => return Err(describe(&e)),
        }
    }
}

/// `WatchFlows` filters over merged protobuf flows (the agent's own filter matches its records).
struct Filter {
    namespace: String,
    pod: String,
    service: String,
    verdict: String,
    since: u64,
}

impl Filter {
    fn new(r: &WatchFlowsRequest) -> Self {
        let service = if r.service.is_empty() || r.service.contains('/') {
            r.service.clone()
        } else {
            format!("default/{}", r.service)
        };
        Self {
            namespace: r.namespace.clone(),
            pod: r.pod.clone(),
            service,
            verdict: r.verdict.clone(),
            since: if r.since_seconds == 0 {
                0
            } else {
                unix_nanos().saturating_sub(r.since_seconds.saturating_mul(1_000_000_000))
            },
        }
    }

    fn matches(&self, f: &Flow) -> bool {
        (self.namespace.is_empty()
            || f.source_namespace == self.namespace
            || f.service
                .split_once('/')
                .is_some_and(|(ns, _)| ns == self.namespace))
            && (self.pod.is_empty() || f.source_pod == self.pod)
            && (self.service.is_empty() || f.service == self.service)
            && (self.verdict.is_empty() || f.verdict == self.verdict)
            && f.time_unix_nano >= self.since
    }
}

/// The relay's API: `WatchFlows` over every agent, `Status` with one source per agent.
struct RelayService {
    hub: Arc<Hub>,
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

fn relay_only() -> Status {
    Status::unimplemented(
        "the relay serves WatchFlows and Status; ask a node's agent (meshctl without --server)",
    )
}

#[tonic::async_trait]
impl Admin for RelayService {
    type WatchFlowsStream = FlowStream;

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let agents = self
            .hub
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect::<Vec<_>>();
        let connected = agents.iter().filter(|a| a.connected).count();
        Ok(Response::new(StatusResponse {
            node: "relay".to_owned(),
            source: format!("{connected}/{} agents", agents.len()),
            ready: connected > 0,
            not_ready_reason: if connected > 0 {
                String::new()
            } else {
                "no agent connected".to_owned()
            },
            uptime_seconds: self.hub.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            // Every flow the relay took (its merged numbering), not only the ones still kept.
            flows_received_total: self.hub.ring.published(),
            // Flows the agents numbered but never sent (gaps in their seqs).
            flows_lagged_total: agents.iter().map(|a| a.missed).sum(),
            sources: agents
                .iter()
                .map(|a| SourceStatus {
                    name: if a.node.is_empty() {
                        a.address.clone()
                    } else {
                        format!("{} ({})", a.node, a.address)
                    },
                    state: if a.connected { "running" } else { "down" }.to_owned(),
                    reason: if a.connected {
                        String::new()
                    } else {
                        a.last_error.clone()
                    },
                    restarts: a.reconnects,
                    synced: a.connected_at.is_some(),
                    last_sync_age_ms: a.connected_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                    last_error: a.last_error.clone(),
                })
                .collect(),
            ..StatusResponse::default()
        }))
    }

    async fn watch_flows(
        &self,
        req: Request<WatchFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = req.into_inner();
        let filter = Filter::new(&req);
        // Subscribed before the history is copied; what both hold is dropped from live by the
        // merged number, as the agent does with its seq.
        let live = self.hub.ring.subscribe();
        let (recent, history_end) = self.hub.recent_numbered();
        let history: Vec<Result<Flow, Status>> = recent
            .into_iter()
            .filter(|f| filter.matches(f))
            .map(Ok)
            .collect();
        let history = tokio_stream::iter(history);
        if !req.follow {
            return Ok(Response::new(Box::pin(history)));
        }
        let live = crate::flows::follow(Arc::clone(&self.hub.ring), history_end, live).filter_map(
            move |item| match item {
                Followed::Item(f) if filter.matches(&f.flow) => Some(Ok(f.flow)),
                Followed::Item(_) => None,
                Followed::Lost(n) => {
                    warn!(
                        missed = n,
                        "a relay flow watcher fell behind past the kept history"
                    );
                    None
                }
            },
        );
        Ok(Response::new(Box::pin(history.chain(live))))
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Err(relay_only())
    }
    async fn list_backends(
        &self,
        _: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        Err(relay_only())
    }
    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        Err(relay_only())
    }
    async fn config_dump(
        &self,
        _: Request<ConfigDumpRequest>,
    ) -> Result<Response<ConfigDumpResponse>, Status> {
        Err(relay_only())
    }
    async fn list_policies(
        &self,
        _: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        Err(relay_only())
    }
    async fn list_tunnels(
        &self,
        _: Request<ListTunnelsRequest>,
    ) -> Result<Response<ListTunnelsResponse>, Status> {
        Err(relay_only())
    }
    async fn report_backend_result(
        &self,
        _: Request<crate::admin::proto::ReportBackendResultRequest>,
    ) -> Result<Response<crate::admin::proto::ReportBackendResultResponse>, Status> {
        Err(relay_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_get_the_default_port_only_when_they_have_none() {
        assert_eq!(with_port("10.0.0.1", 4244), "10.0.0.1:4244");
        assert_eq!(with_port("10.0.0.1:9000", 4244), "10.0.0.1:9000");
        assert_eq!(with_port("node-a", 4244), "node-a:4244");
        assert_eq!(with_port("fd00::1", 4244), "[fd00::1]:4244");
        assert_eq!(with_port("[fd00::1]:9000", 4244), "[fd00::1]:9000");
    }

    #[test]
    fn the_relay_filter_matches_as_the_agents_does() {
        let f = Flow {
            verdict: "open".to_owned(),
            source_namespace: "shop".to_owned(),
            source_pod: "client".to_owned(),
            service: "default/web".to_owned(),
            time_unix_nano: unix_nanos(),
            ..Flow::default()
        };
        let req = |service: &str, namespace: &str, verdict: &str| WatchFlowsRequest {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            verdict: verdict.to_owned(),
            since_seconds: 60,
            ..WatchFlowsRequest::default()
        };
        assert!(
            Filter::new(&req("web", "", "")).matches(&f),
            "name = default/name"
        );
        assert!(
            Filter::new(&req("", "default", "open")).matches(&f),
            "the service's namespace"
        );
        assert!(
            Filter::new(&req("", "shop", "")).matches(&f),
            "the source's namespace"
        );
        assert!(!Filter::new(&req("", "other", "")).matches(&f));
        assert!(!Filter::new(&req("", "", "close")).matches(&f));
        let old = Flow {
            time_unix_nano: 1,
            ..f.clone()
        };
        assert!(
            !Filter::new(&req("", "", "")).matches(&old),
            "older than since"
        );
    }

    #[test]
    fn the_relay_resumes_by_the_agents_seq_not_by_time() {
        let flow = |instance: u64, seq: u64, time: u64| Flow {
            instance,
            seq,
            time_unix_nano: time,
            ..Flow::default()
        };
        let mut p = Position::default();
        let mut take = |f: Flow| p.admit(&f);
        // The first contact starts where the agent's history starts.
        assert_eq!(take(flow(7, 40, 1_000)), Admit::New { missed: 0 });
        // Stamped earlier than the flow before it (another CPU's event): still new.
        assert_eq!(take(flow(7, 41, 900)), Admit::New { missed: 0 });
        assert_eq!(take(flow(7, 42, 900)), Admit::New { missed: 0 });
        // A reconnect replays the history: what was taken is skipped, the rest taken.
        for seq in 40..=42 {
            assert_eq!(take(flow(7, seq, 1_000)), Admit::Repeat, "seq {seq}");
        }
        assert_eq!(take(flow(7, 43, 1_100)), Admit::New { missed: 0 });
        // A gap: the agent numbered two flows the relay never got.
        assert_eq!(take(flow(7, 46, 1_200)), Admit::New { missed: 2 });
        // The agent restarted: another instance, numbering from 1 again, followed.
        assert_eq!(take(flow(9, 1, 500)), Admit::Restarted);
        assert_eq!(take(flow(9, 2, 600)), Admit::New { missed: 0 });
        assert_eq!(take(flow(9, 2, 600)), Admit::Repeat);
        // An agent older than the numbering: by time, as before.
        let mut old = Position::default();
        assert_eq!(old.admit(&flow(0, 0, 10)), Admit::New { missed: 0 });
        assert_eq!(old.admit(&flow(0, 0, 10)), Admit::Repeat);
        assert_eq!(old.admit(&flow(0, 0, 11)), Admit::New { missed: 0 });
    }
}
