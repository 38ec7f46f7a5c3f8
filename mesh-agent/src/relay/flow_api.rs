//! The agent's flow API for the relay: `WatchFlows` and `Status` of the admin API on TCP with
//! mutual TLS (off by default; `--flow-api-listen`, Hubble's agent port 4244). Every other admin
//! call stays on the root-only Unix socket: a relay certificate must not read the config dump.
//!
//! The certificate comes from the mesh CA (with `--ca-address`): the agent asks for its **own
//! pod's** identity (`--flow-api-id`, `spiffe://<td>/ns/mesh-system/sa/mesh-agent`) through the
//! same workload path and renewal as any pod's, and requires the relay's id
//! (`--flow-api-client-id`) of the client. Or from files (`--flow-api-cert/key/ca`).

use std::{collections::BTreeMap, net::SocketAddr, pin::Pin, sync::Arc, sync::OnceLock};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::tls::{self, CaCredentials, Credentials, FileCredentials, TlsError};
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
    identity::{SpiffeId, SpiffeIdError, cli::AgentCaArgs},
    model::ObjectName,
};

/// Hubble's agent port.
pub const DEFAULT_PORT: u16 = 4244;

/// The agent's flags for the flow API.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FlowApiArgs {
    /// Serve `WatchFlows`/`Status` on this address with mTLS for the relay (e.g. `0.0.0.0:4244`);
    /// off by default. The certificate comes from the mesh CA (--ca-address), or from
    /// --flow-api-cert, --flow-api-key and --flow-api-ca.
    #[arg(long, env = "MESH_FLOW_API_LISTEN")]
    pub flow_api_listen: Option<SocketAddr>,
    /// File mode: the agent's certificate (PEM; must name `flows.mesh-system.svc`, or what the
    /// relay's --agent-server-name says, unless the relay checks --agent-id).
    #[arg(long, env = "MESH_FLOW_API_CERT", requires = "flow_api_listen")]
    pub flow_api_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "MESH_FLOW_API_KEY", requires = "flow_api_listen")]
    pub flow_api_key: Option<std::path::PathBuf>,
    /// File mode: roots the relay's client certificate must chain to (PEM).
    #[arg(long, env = "MESH_FLOW_API_CA", requires = "flow_api_listen")]
    pub flow_api_ca: Option<std::path::PathBuf>,
    /// The SPIFFE id the relay's client certificate must carry (URI SAN). Mesh CA mode: default
    /// `spiffe://<trust domain>/ns/mesh-system/sa/mesh-relay`; file mode: checked only when set.
    #[arg(long, env = "MESH_FLOW_API_CLIENT_ID")]
    pub flow_api_client_id: Option<String>,
    /// Mesh CA mode: the agent's own id its certificate is asked for (default
    /// `spiffe://<trust domain>/ns/mesh-system/sa/mesh-agent`, the `DaemonSet`'s account).
    #[arg(long, env = "MESH_FLOW_API_ID")]
    pub flow_api_id: Option<String>,
    /// Mesh CA mode: the agent's pod (the downward API's `metadata.name`), which the CA checks
    /// runs on this node under the id's service account.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
}

/// What the agent serves, set once at start by `main` (in mesh CA mode the configuration's
/// certificate resolver holds the identity manager renewing the certificate, so it lives as long).
static INSTALLED: OnceLock<(SocketAddr, Arc<rustls::ServerConfig>)> = OnceLock::new();

/// Flow API settings that cannot work, naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum FlowApiError {
    #[error(
        "--flow-api-listen needs the mesh CA (--ca-address) or --flow-api-cert, --flow-api-key and --flow-api-ca"
    )]
    Incomplete,
    #[error("--flow-api-cert, --flow-api-key and --flow-api-ca go together")]
    PartialFiles,
    #[error("{flag} {value:?}: {source}")]
    Id {
        flag: &'static str,
        value: String,
        source: SpiffeIdError,
    },
    #[error("{flag} {id}: outside the agent's trust domain {trust_domain}")]
    TrustDomain {
        flag: &'static str,
        id: SpiffeId,
        trust_domain: String,
    },
    #[error(
        "the flow API's certificate from the mesh CA needs the agent's pod name (--pod-name, POD_NAME from the downward API)"
    )]
    PodName,
    #[error("flow API: {0}")]
    Ca(String),
    #[error("flow API: {0}")]
    Tls(#[from] TlsError),
}

/// `value` as an id of `trust_domain`, or the default `<td>/ns/<namespace>/sa/<name>`.
pub fn id_or_default(
    flag: &'static str,
    value: Option<&str>,
    trust_domain: &str,
    (namespace, name): (&str, &str),
) -> Result<SpiffeId, FlowApiError> {
    let id = match value {
        Some(v) => v.parse().map_err(|source| FlowApiError::Id {
            flag,
            value: v.to_owned(),
            source,
        })?,
        None => {
            SpiffeId::new(trust_domain, namespace, name).map_err(|source| FlowApiError::Id {
                flag,
                value: format!("{namespace}/{name}"),
                source,
            })?
        }
    };
    if id.trust_domain() != trust_domain {
        return Err(FlowApiError::TrustDomain {
            flag,
            id,
            trust_domain: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

impl FlowApiArgs {
    /// Checks the settings now (a bad file or id stops the start, naming it), starts asking the
    /// CA for the agent's certificate in mesh CA mode, and keeps the listener's settings for
    /// `spawn`.
    pub fn install(&self, trust_domain: &str, ca: &AgentCaArgs) -> Result<(), FlowApiError> {
        let Some(addr) = self.flow_api_listen else {
            return Ok(());
        };
        let files = match (&self.flow_api_cert, &self.flow_api_key, &self.flow_api_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(FileCredentials::load(cert, key, ca)?),
            (None, None, None) => None,
            _ => return Err(FlowApiError::PartialFiles),
        };
        let config = if let Some(files) = files {
            // File mode: the relay's id is checked only when asked for (a dedicated CA is
            // itself the authorization, as Hubble's).
            let client_id = self
                .flow_api_client_id
                .as_deref()
                .map(|v| {
                    v.parse().map_err(|source| FlowApiError::Id {
                        flag: "--flow-api-client-id",
                        value: v.to_owned(),
                        source,
                    })
                })
                .transpose()?;
            tls::server_config(Arc::new(files), client_id)?
        } else {
            if ca.ca_address.is_none() {
                return Err(FlowApiError::Incomplete);
            }
            let own = id_or_default(
                "--flow-api-id",
                self.flow_api_id.as_deref(),
                trust_domain,
                tls::DEFAULT_AGENT_ACCOUNT,
            )?;
            let client_id = id_or_default(
                "--flow-api-client-id",
                self.flow_api_client_id.as_deref(),
                trust_domain,
                tls::DEFAULT_RELAY_ACCOUNT,
            )?;
            let pod_name = self
                .pod_name
                .as_deref()
                .filter(|p| !p.is_empty())
                .ok_or(FlowApiError::PodName)?;
            // A manager of its own (not the node's workload one, whose set follows the enrolled
            // pods): the same CA path, renewal and retry for exactly this one identity.
            let Some(manager) = ca
                .manager(trust_domain)
                .map_err(|e| FlowApiError::Ca(e.to_string()))?
            else {
                warn!(%addr, "flow API not served: no CA root bundle yet (restart the agent once the CA has published it)");
                return Ok(());
            };
            let pod = ObjectName::new(own.namespace(), pod_name);
            manager.set_workloads(&BTreeMap::from([(pod.clone(), own.clone())]));
            info!(identity = %own, %pod, relay = %client_id, "flow API certificate from the mesh CA");
            let creds: Arc<dyn Credentials> = Arc::new(CaCredentials::new(manager, own));
            tls::server_config(creds, Some(client_id))?
        };
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
