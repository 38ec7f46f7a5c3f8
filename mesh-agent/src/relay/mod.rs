//! The relay (`mesh-agent relay`, Hubble Relay's role): gathers flows from every agent over the
//! admin flow API on mTLS, serves them merged on the same `WatchFlows` API, and a live map page.

pub mod flow_api;
pub mod graph;
pub mod tls;
mod web;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, sync::broadcast};
use tokio_stream::{Stream, StreamExt as _, wrappers::BroadcastStream};
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
    #[arg(long, value_delimiter = ',', required = true)]
    pub agents: Vec<String>,
    /// The name every agent's flow API certificate carries.
    #[arg(long, default_value = tls::DEFAULT_SERVER_NAME)]
    pub agent_server_name: String,
    /// The relay's client certificate, key, and the roots agents' certificates chain to.
    #[command(flatten)]
    pub tls: tls::TlsFiles,
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
    #[error("--agent-server-name {0:?}: not a DNS name or IP address")]
    ServerName(String),
    #[error("--web-listen {0:?}: not an address or `none`")]
    WebListen(String),
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
}

/// Merged recent flows, live subscribers and the agents' states.
pub struct Hub {
    recent: Mutex<VecDeque<Flow>>,
    live: broadcast::Sender<Flow>,
    agents: Mutex<Vec<AgentState>>,
    started: Instant,
}

impl Hub {
    fn new(addresses: &[String]) -> Self {
        Self {
            recent: Mutex::new(VecDeque::new()),
            live: broadcast::channel(crate::flows::BROADCAST_CAPACITY).0,
            agents: Mutex::new(
                addresses
                    .iter()
                    .map(|a| AgentState {
                        address: a.clone(),
                        ..AgentState::default()
                    })
                    .collect(),
            ),
            started: Instant::now(),
        }
    }

    fn publish(&self, flow: Flow) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT_CAPACITY {
                recent.pop_front();
            }
            recent.push_back(flow.clone());
        }
        let _ = self.live.send(flow);
    }

    /// Recent flows in time order (agents' streams interleave on arrival).
    fn recent(&self) -> Vec<Flow> {
        let mut v: Vec<Flow> = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        v.sort_by_key(|f| f.time_unix_nano);
        v
    }

    fn agent(&self, i: usize, f: impl FnOnce(&mut AgentState)) {
        if let Some(a) = self
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(i)
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
    let client = Arc::new(args.tls.client_config()?);
    let name = ServerName::try_from(args.agent_server_name.clone())
        .map_err(|_| RelayError::ServerName(args.agent_server_name.clone()))?;
    let web: Option<SocketAddr> = match args.web_listen.as_str() {
        "none" => None,
        s => Some(s.parse().map_err(|_| RelayError::WebListen(s.to_owned()))?),
    };
    let agents: Vec<String> = args
        .agents
        .iter()
        .map(|a| {
            if a.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !a.ends_with(']')
            {
                a.clone()
            } else {
                format!("{a}:{}", flow_api::DEFAULT_PORT)
            }
        })
        .collect();
    let hub = Arc::new(Hub::new(&agents));
    for (i, addr) in agents.iter().enumerate() {
        tokio::spawn(follow_agent(
            Arc::clone(&hub),
            i,
            addr.clone(),
            name.clone(),
            Arc::clone(&client),
        ));
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
    info!(addr = %args.listen, agents = agents.len(), "relay listening");
    let result = tonic::transport::Server::builder()
        .add_service(AdminServer::new(RelayService { hub }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await;
    if let Err(e) = result {
        warn!(error = %e, "relay API stopped");
    }
    Ok(())
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

/// Follows one agent's flows forever, reconnecting with backoff. After a reconnect the agent
/// sends its history again: flows not newer than the last one kept are skipped.
async fn follow_agent(
    hub: Arc<Hub>,
    i: usize,
    addr: String,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) {
    let mut last_seen = 0u64;
    let mut backoff = Duration::from_millis(200);
    loop {
        let Err(error) = stream_agent(&hub, i, &addr, &name, &config, &mut last_seen).await;
        let was_connected = hub
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(i)
            .is_some_and(|a| a.connected);
        if was_connected {
            backoff = Duration::from_millis(200);
        }
        warn!(agent = %addr, %error, retry_in = ?backoff, "agent flow stream down");
        hub.agent(i, |a| {
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
    i: usize,
    addr: &str,
    name: &ServerName<'static>,
    config: &Arc<rustls::ClientConfig>,
    last_seen: &mut u64,
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
    hub.agent(i, |a| {
        a.node.clone_from(&node);
        a.connected = true;
        a.connected_at = Some(Instant::now());
    });
    info!(agent = %addr, %node, "following the agent's flows");
    loop {
        match stream.message().await {
            Ok(Some(mut f)) => {
                if f.time_unix_nano <= *last_seen {
                    continue;
                }
                *last_seen = f.time_unix_nano;
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
            .clone();
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
            flows_received_total: self
                .hub
                .recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
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
        let live = self.hub.live.subscribe();
        let history: Vec<Result<Flow, Status>> = self
            .hub
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
                warn!(missed = n, "a relay flow watcher fell behind");
                None
            }
        });
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
}
