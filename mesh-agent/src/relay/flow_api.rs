//! The agent's flow API for the relay: `WatchFlows` and `Status` of the admin API on TCP with
//! mutual TLS (off by default; `--flow-api-listen`, Hubble's agent port 4244). Every other admin
//! call stays on the root-only Unix socket: a relay certificate must not read the config dump.

use std::{net::SocketAddr, pin::Pin, sync::Arc, sync::OnceLock};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::tls::{TlsError, TlsFiles};
use crate::{
    admin::{
        AdminService,
        proto::{
            ConfigDumpRequest, ConfigDumpResponse, Flow, ListBackendsRequest, ListBackendsResponse,
            ListIdentitiesRequest, ListIdentitiesResponse, ListPoliciesRequest,
            ListPoliciesResponse, ListServicesRequest, ListServicesResponse, ListTunnelsRequest,
            ListTunnelsResponse, StatusRequest, StatusResponse, WatchFlowsRequest,
            admin_server::{Admin, AdminServer},
        },
    },
    app::Shared,
};

/// Hubble's agent port.
pub const DEFAULT_PORT: u16 = 4244;

/// The agent's flags for the flow API.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FlowApiArgs {
    /// Serve `WatchFlows`/`Status` on this address with mTLS for the relay (e.g. `0.0.0.0:4244`);
    /// off by default. Needs --flow-api-cert, --flow-api-key and --flow-api-ca.
    #[arg(long, env = "MESH_FLOW_API_LISTEN")]
    pub flow_api_listen: Option<SocketAddr>,
    /// The agent's certificate for it (PEM; must name `flows.mesh-system.svc`, or what the relay's
    /// --agent-server-name says).
    #[arg(long, env = "MESH_FLOW_API_CERT", requires = "flow_api_listen")]
    pub flow_api_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "MESH_FLOW_API_KEY", requires = "flow_api_listen")]
    pub flow_api_key: Option<std::path::PathBuf>,
    /// Roots the relay's client certificate must chain to (PEM).
    #[arg(long, env = "MESH_FLOW_API_CA", requires = "flow_api_listen")]
    pub flow_api_ca: Option<std::path::PathBuf>,
}

/// What the agent serves, set once at start by `main`.
static INSTALLED: OnceLock<(SocketAddr, Arc<rustls::ServerConfig>)> = OnceLock::new();

/// A listen address without certificate files.
#[derive(Debug, thiserror::Error)]
pub enum FlowApiError {
    #[error("--flow-api-listen needs --flow-api-cert, --flow-api-key and --flow-api-ca")]
    Incomplete,
    #[error("flow API: {0}")]
    Tls(#[from] TlsError),
}

impl FlowApiArgs {
    /// Checks the files now (a bad file stops the start, naming it) and keeps the listener's
    /// settings for `spawn`.
    pub fn install(&self) -> Result<(), FlowApiError> {
        let Some(addr) = self.flow_api_listen else {
            return Ok(());
        };
        let (Some(cert), Some(key), Some(ca)) = (
            self.flow_api_cert.clone(),
            self.flow_api_key.clone(),
            self.flow_api_ca.clone(),
        ) else {
            return Err(FlowApiError::Incomplete);
        };
        let config = TlsFiles { cert, key, ca }.server_config()?;
        let _ = INSTALLED.set((addr, Arc::new(config)));
        Ok(())
    }
}

/// Starts the flow API if `main` installed one.
pub fn spawn(shared: &Arc<Shared>) {
    if let Some((addr, config)) = INSTALLED.get() {
        let service = FlowsOnly(AdminService::new(Arc::clone(shared)));
        tokio::spawn(super::serve_tls(
            *addr,
            Arc::clone(config),
            AdminServer::new(service),
            "flow API",
        ));
        info!(%addr, "flow API (mTLS) listening");
    }
}

/// The admin service with only the relay's calls.
struct FlowsOnly(AdminService);

fn socket_only() -> Status {
    Status::permission_denied(
        "only WatchFlows and Status are served over TCP; use the node's admin socket",
    )
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for FlowsOnly {
    type WatchFlowsStream = FlowStream;

    async fn status(&self, r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.0.status(r).await
    }
    async fn watch_flows(
        &self,
        r: Request<WatchFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        self.0.watch_flows(r).await
    }
    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Err(socket_only())
    }
    async fn list_backends(
        &self,
        _: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        Err(socket_only())
    }
    async fn list_identities(
        &self,
        _: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        Err(socket_only())
    }
    async fn config_dump(
        &self,
        _: Request<ConfigDumpRequest>,
    ) -> Result<Response<ConfigDumpResponse>, Status> {
        Err(socket_only())
    }
    async fn list_policies(
        &self,
        _: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        Err(socket_only())
    }
    async fn list_tunnels(
        &self,
        _: Request<ListTunnelsRequest>,
    ) -> Result<Response<ListTunnelsResponse>, Status> {
        Err(socket_only())
    }
    async fn report_backend_result(
        &self,
        _: Request<crate::admin::proto::ReportBackendResultRequest>,
    ) -> Result<Response<crate::admin::proto::ReportBackendResultResponse>, Status> {
        Err(socket_only())
    }
}
