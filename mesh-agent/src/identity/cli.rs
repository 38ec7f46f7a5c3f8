//! `mesh-agent ca …`: run the CA, make a root, or make a static-mode bootstrap token.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::{Args, Subcommand};
use tracing::info;

use super::{
    auth::{self, KubeAuth, NodeAuth, StaticAuth},
    ca::{CaError, CaMaterial, CertificateAuthority, Lifetimes},
    server::{CaCounters, CaServer, DEFAULT_CA_PORT},
};
use crate::model::ObjectName;

/// The CA's command line.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: Option<CaCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a static-mode bootstrap token for a node: prints the token (give it to that node's
    /// agent as --ca-token-file) and appends its SHA-256 to the token file (remove the line to revoke).
    Bootstrap {
        #[arg(long)]
        node: String,
        /// Token file (default: <dir>/bootstrap-tokens).
        #[arg(long)]
        tokens: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Generate a root (ca-cert.pem, ca-key.pem 0600) in a directory and exit: a new root for a
    /// rotation, or a root of your own to sign an intermediate with.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Make an intermediate signed by the CA in this directory instead of a root (its
        /// cert-chain.pem then holds the parent's certificate and chain).
        #[arg(long)]
        signed_by: Option<PathBuf>,
    },
}

/// The relay's service account as deploy/kubernetes/relay.yaml makes it.
pub const DEFAULT_RELAY_SERVICE_ACCOUNT: &str = "mesh-system/mesh-relay";

/// Default directory of a generated root and the bootstrap tokens.
pub const DEFAULT_DIR: &str = "/var/lib/mesh-ca";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// gRPC (TLS 1.3) listen address.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_CA_PORT)))]
    pub listen: SocketAddr,
    /// Prometheus metrics (`/metrics`); `none` to disable.
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub metrics_addr: String,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Generated-root mode: the root is created here on first start and reused after.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Given key pair: the signing certificate (a root, or an intermediate with --ca-chain).
    #[arg(long, requires = "ca_key", conflicts_with = "ca_secret")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Certificates above --ca-cert up to and including your root (intermediate mode).
    #[arg(long, requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// Read ca-cert.pem, ca-key.pem (and cert-chain.pem) from this Secret (`namespace/name`);
    /// if it does not exist, generate a root and create it (as istiod's `istio-ca-secret`), so a
    /// CA Deployment keeps its root across restarts without a volume.
    #[arg(long)]
    pub ca_secret: Option<String>,
    /// Kubernetes: publish the trust bundle (`root-cert.pem`) in this `ConfigMap`
    /// (`namespace/name`) at start, for agents to mount as --ca-root-file (Istio's
    /// `istio-ca-root-cert`).
    #[arg(long)]
    pub root_configmap: Option<String>,
    /// Extra roots (PEM) sent in the trust bundle: the other root during a rotation.
    #[arg(long)]
    pub extra_roots: Option<PathBuf>,
    /// Names (DNS or IP) in the CA's serving certificate.
    #[arg(long = "server-name", default_values_t = ["mesh-ca.mesh-system.svc".to_owned(), "localhost".to_owned(), "127.0.0.1".to_owned()])]
    pub server_names: Vec<String>,
    /// Default workload certificate lifetime.
    #[arg(long, default_value = "24h")]
    pub workload_ttl: humantime::Duration,
    /// Longest lifetime an agent may ask for.
    #[arg(long, default_value = "90days")]
    pub max_workload_ttl: humantime::Duration,
    /// Kubernetes mode: `TokenReview` for nodes, the API for pods.
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig (default: in-cluster or $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The node agents' service account (`namespace/name`), the only one whose tokens count.
    #[arg(long, default_value = "mesh-system/mesh-agent")]
    pub agent_service_account: String,
    /// Kubernetes mode: the relay's service account (`namespace/name`, or `none`): a reviewed
    /// token of it may get exactly `spiffe://<td>/ns/<namespace>/sa/<name>` (the relay's client
    /// certificate for the agents' flow API) and nothing else.
    #[arg(long, default_value = DEFAULT_RELAY_SERVICE_ACCOUNT)]
    pub relay_service_account: String,
    /// Static mode: the cluster file (as the agents read) whose pods the CA authorizes.
    #[arg(long)]
    pub static_pods: Option<PathBuf>,
    /// Static mode: bootstrap token file (default: <dir>/bootstrap-tokens).
    #[arg(long)]
    pub bootstrap_tokens: Option<PathBuf>,
}

/// What `mesh-agent ca` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{0}")]
    Other(String),
}

fn split_name(what: &str, v: &str) -> Result<ObjectName, CliError> {
    v.split_once('/')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .map(|(a, b)| ObjectName::new(a, b))
        .ok_or_else(|| CliError::Other(format!("{what} {v:?}: expected namespace/name")))
}

/// Runs the subcommand or serves until SIGTERM/SIGINT.
pub async fn run(args: CaArgs) -> Result<(), CliError> {
    match args.command {
        Some(CaCommand::Bootstrap { node, tokens, dir }) => {
            let file = tokens.unwrap_or_else(|| dir.join(auth::BOOTSTRAP_TOKENS));
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| CliError::Other(format!("{}: {e}", parent.display())))?;
            }
            let token = auth::bootstrap(&file, &node)
                .map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
            println!("{token}");
            Ok(())
        }
        Some(CaCommand::Init {
            dir,
            trust_domain,
            signed_by,
        }) => {
            if dir.join(super::ca::CA_KEY).exists() {
                return Err(CliError::Other(format!(
                    "{}: already holds a CA key; refusing to overwrite it",
                    dir.display()
                )));
            }
            match signed_by {
                Some(parent) => CaMaterial::read_dir(&parent)?
                    .issue_intermediate(&trust_domain)?
                    .write_dir(&dir)?,
                None => {
                    CaMaterial::load_or_generate(&dir, &trust_domain)?;
                }
            }
            println!("{}", dir.join(super::ca::CA_CERT).display());
            Ok(())
        }
        None => serve(args.serve).await,
    }
}

async fn material(a: &ServeArgs) -> Result<CaMaterial, CliError> {
    if let (Some(cert), Some(key)) = (&a.ca_cert, &a.ca_key) {
        return Ok(CaMaterial::read_files(cert, key, a.ca_chain.as_deref())?);
    }
    if let Some(secret) = &a.ca_secret {
        let name = split_name("--ca-secret", secret)?;
        let client = auth::kube_client(a.kubeconfig.as_deref())
            .await
            .map_err(|e| CliError::Other(format!("Kubernetes client: {e}")))?;
        return secret_material(client, &name, &a.trust_domain).await;
    }
    let (m, generated) = CaMaterial::load_or_generate(&a.dir, &a.trust_domain)?;
    if generated {
        info!(dir = %a.dir.display(), "generated a new root CA");
    }
    Ok(m)
}

/// The Secret's `ca-cert.pem`, `ca-key.pem` and optional `cert-chain.pem` (Istio's `cacerts`
/// names); a missing Secret is created with a generated root. Two replicas starting at once:
/// the loser's create fails with a conflict and it reads the winner's.
async fn secret_material(
    client: kube::Client,
    name: &ObjectName,
    trust_domain: &str,
) -> Result<CaMaterial, CliError> {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    let api: kube::Api<Secret> = kube::Api::namespaced(client, &name.namespace);
    let secret = match api.get(&name.name).await {
        Ok(s) => s,
        Err(kube::Error::Api(s)) if s.code == 404 || s.is_not_found() => {
            let root = CaMaterial::generate_root(trust_domain)?;
            let new = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.name.clone()),
                    namespace: Some(name.namespace.clone()),
                    ..Default::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(
                    [
                        (
                            super::ca::CA_CERT.to_owned(),
                            ByteString(root.cert_pem.clone().into_bytes()),
                        ),
                        (
                            super::ca::CA_KEY.to_owned(),
                            ByteString(root.key_pem.clone().into_bytes()),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            };
            match api.create(&kube::api::PostParams::default(), &new).await {
                Ok(_) => {
                    info!(secret = %name, "generated a new root CA and stored it");
                    return Ok(CaMaterial {
                        origin: format!("secret {name}"),
                        ..root
                    });
                }
                Err(kube::Error::Api(s)) if s.code == 409 => api
                    .get(&name.name)
                    .await
                    .map_err(|e| CliError::Other(format!("secret {name}: {e}")))?,
                Err(e) => return Err(CliError::Other(format!("creating secret {name}: {e}"))),
            }
        }
        Err(e) => return Err(CliError::Other(format!("secret {name}: {e}"))),
    };
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| -> Result<Option<String>, CliError> {
        data.get(key)
            .map(|b| {
                String::from_utf8(b.0.clone()).map_err(|_| {
                    CliError::Other(format!("secret {name}: data.{key} is not UTF-8 PEM"))
                })
            })
            .transpose()
    };
    let need = |key: &str| {
        field(key)?.ok_or_else(|| CliError::Other(format!("secret {name}: data.{key} is missing")))
    };
    Ok(CaMaterial {
        origin: format!("secret {name}"),
        cert_pem: need(super::ca::CA_CERT)?,
        key_pem: need(super::ca::CA_KEY)?,
        chain_pem: field(super::ca::CERT_CHAIN)?,
    })
}

/// Writes the CA's trust bundle into a `ConfigMap`: created, or its `data` merge-patched when it
/// exists (a restart after a rotation step replaces the bundle).
pub async fn publish_roots(
    client: kube::Client,
    name: &ObjectName,
    ca: &CertificateAuthority,
) -> Result<(), CliError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let pem: String = ca
        .roots()
        .iter()
        .map(|r| super::ca::pem_certificate(r))
        .collect();
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, &name.namespace);
    let err =
        |e: kube::Error| CliError::Other(format!("publishing roots to configmap {name}: {e}"));
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.name.clone()),
            namespace: Some(name.namespace.clone()),
            ..Default::default()
        },
        data: Some([(ROOT_CERT_KEY.to_owned(), pem.clone())].into()),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &cm).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch = serde_json::json!({ "data": { ROOT_CERT_KEY: pem } });
            api.patch(
                &name.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .map_err(err)?;
        }
        Err(e) => return Err(err(e)),
    }
    info!(configmap = %name, roots = ca.roots().len(), "trust bundle published");
    Ok(())
}

/// The key of the published bundle (Istio's `istio-ca-root-cert` uses the same).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Builds the CA and its authenticator from `a`.
pub async fn build(a: &ServeArgs) -> Result<(Arc<CertificateAuthority>, NodeAuth), CliError> {
    let m = material(a).await?;
    let extra = a.extra_roots.as_deref().map(read).transpose()?;
    let lifetimes = Lifetimes {
        default: Duration::from(a.workload_ttl),
        max: Duration::from(a.max_workload_ttl),
    };
    let ca = Arc::new(CertificateAuthority::new(
        &m,
        extra.as_deref(),
        &a.trust_domain,
        lifetimes,
    )?);
    let auth = if a.kubernetes {
        let client = auth::kube_client(a.kubeconfig.as_deref())
            .await
            .map_err(|e| CliError::Other(format!("Kubernetes client: {e}")))?;
        let sa = split_name("--agent-service-account", &a.agent_service_account)?;
        if let Some(cm) = &a.root_configmap {
            publish_roots(client.clone(), &split_name("--root-configmap", cm)?, &ca).await?;
        }
        let mut kube = KubeAuth::new(client, &sa);
        if a.relay_service_account != "none" {
            let relay = split_name("--relay-service-account", &a.relay_service_account)?;
            if relay == sa {
                return Err(CliError::Other(format!(
                    "--relay-service-account {relay} is the agents' account: the relay needs its own"
                )));
            }
            auth::relay_id(&a.trust_domain, &relay)
                .map_err(|e| CliError::Other(format!("--relay-service-account {relay}: {e}")))?;
            kube = kube.with_relay(&relay);
        }
        NodeAuth::Kubernetes(kube)
    } else {
        let pods = a
            .static_pods
            .clone()
            .ok_or_else(|| CliError::Other("static mode needs --static-pods".to_owned()))?;
        let tokens = a
            .bootstrap_tokens
            .clone()
            .unwrap_or_else(|| a.dir.join(auth::BOOTSTRAP_TOKENS));
        NodeAuth::Static(StaticAuth::new(tokens, pods))
    };
    Ok((ca, auth))
}

fn read(p: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(p).map_err(|e| CliError::Other(format!("{}: {e}", p.display())))
}

async fn serve(a: ServeArgs) -> Result<(), CliError> {
    let (ca, auth) = build(&a).await?;
    let mut server = CaServer::start(a.listen, ca, auth, &a.server_names)
        .await
        .map_err(|e| CliError::Other(e.to_string()))?;
    if a.metrics_addr != "none" {
        let addr: SocketAddr = a
            .metrics_addr
            .parse()
            .map_err(|e| CliError::Other(format!("--metrics-addr {:?}: {e}", a.metrics_addr)))?;
        tokio::spawn(serve_metrics(addr, Arc::clone(&server.counters)));
    }
    // Printed for scripts and tests that start the CA on port 0.
    println!("listening {}", server.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Other(format!("SIGTERM handler: {e}")))?;
    tokio::select! {
        r = server.wait() => r.map_err(|e| CliError::Other(e.to_string())),
        _ = term.recv() => { server.shutdown().await; Ok(()) }
        _ = tokio::signal::ctrl_c() => { server.shutdown().await; Ok(()) }
    }
}

/// `/metrics` (Prometheus text) with the request counters.
async fn serve_metrics(addr: SocketAddr, counters: Arc<CaCounters>) {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "CA metrics not served");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let body = counters.render();
                async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The agent's flags for reaching the CA (workload certificates are managed only when
/// `--ca-address` is given).
#[derive(Args, Clone, Debug, Default)]
pub struct AgentCaArgs {
    /// The CA (`host:port`, e.g. `mesh-ca.mesh-system.svc:15012`).
    #[arg(long, env = "MESH_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Name the CA's certificate must carry (default: the host of --ca-address).
    #[arg(long, env = "MESH_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// PEM roots trusted for the CA before it sends its bundle (Kubernetes: a `ConfigMap`).
    #[arg(long, env = "MESH_CA_ROOT_FILE")]
    pub ca_root_file: Option<PathBuf>,
    /// The node's credential: a projected service-account token (re-read at every request) or
    /// a static bootstrap token (`mesh-agent ca bootstrap`).
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// Lifetime asked for workload certificates (default: the CA's, 24 h).
    #[arg(long, env = "MESH_WORKLOAD_CERT_TTL")]
    pub workload_cert_ttl: Option<humantime::Duration>,
}

impl AgentCaArgs {
    /// The manager these flags describe, or `None` without `--ca-address`. The trust domain is
    /// the agent's one setting (`mesh.trustDomain`, `--trust-domain`), which must be the CA's.
    pub fn manager(
        &self,
        trust_domain: &str,
    ) -> Result<Option<super::manager::IdentityManager>, CliError> {
        let Some(addr) = &self.ca_address else {
            return Ok(None);
        };
        let root_file = self.ca_root_file.as_ref().ok_or_else(|| {
            CliError::Other("--ca-address needs --ca-root-file (the CA's root, PEM)".to_owned())
        })?;
        let token = self.ca_token_file.clone().ok_or_else(|| {
            CliError::Other("--ca-address needs --ca-token-file (the node's credential)".to_owned())
        })?;
        if !root_file.exists() {
            // The DaemonSet mounts the CA's bundle from an optional ConfigMap: before the CA
            // has published it the node runs L4 only (enrolled cross-node connects are refused,
            // never plaintext) instead of crash-looping.
            tracing::warn!(
                file = %root_file.display(),
                "no CA root bundle yet: mTLS is off on this node until the agent restarts with one"
            );
            return Ok(None);
        }
        let anchors = super::ca::parse_certs(&root_file.display().to_string(), &read(root_file)?)?;
        let server_name = match &self.ca_server_name {
            Some(n) => n.clone(),
            None => addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_owned(),
        };
        let mut config = super::manager::ManagerConfig::new(trust_domain, anchors);
        config.requested_ttl = self.workload_cert_ttl.map(Duration::from);
        Ok(Some(super::manager::IdentityManager::new(
            config,
            super::client::CaEndpoint {
                addr: addr.clone(),
                server_name,
                token: super::client::TokenSource::File(token),
            },
        )))
    }
}
