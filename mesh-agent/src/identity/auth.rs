//! Who is asking the CA (node authentication) and what it may ask for (pod authorization).
//!
//! Kubernetes mode, as istiod: the agent presents its projected service-account token; a
//! `TokenReview` says whether it is valid, whose it is (must be the agent's service account) and,
//! for a bound token, which node the pod holding it runs on (`authentication.kubernetes.io/node-name`
//! in `user.extra`). The CSR's pod is then read from the API: it must be scheduled on that node
//! and run as the requested service account. Static mode: a bootstrap token made at install
//! (`mesh-agent ca bootstrap --node NAME`) names the node; the pods are the static file's.
//!
//! One caller is not a node: the relay (`--relay-service-account`, Kubernetes mode only). A
//! reviewed token of that account may get exactly the relay's own id and nothing else (see
//! [`NodeAuth::authorize_relay`]); Cilium gives Hubble Relay a certificate from a separate CA
//! instead, where holding any certificate of that CA is the authorization.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use sha2::{Digest as _, Sha256};

use super::SpiffeId;
use crate::model::{ClusterModel, ObjectName};

/// The bound-token claim naming the node the token's pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The audience agents request for their CA token and the CA requires (Istio: `istio-ca`).
pub const CA_AUDIENCE: &str = "kernmesh-ca";
/// Bootstrap token file in the CA directory: one `<sha256 hex> <node>` line per token.
pub const BOOTSTRAP_TOKENS: &str = "bootstrap-tokens";

/// A node's credential was not accepted: `UNAUTHENTICATED`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

/// A request the node may not make, or that could not be decided.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// `PERMISSION_DENIED`.
    #[error("{0}")]
    Denied(String),
    /// `UNAVAILABLE`: the API or the static file could not be read; the agent retries.
    #[error("{0}")]
    Unavailable(String),
}

/// Who a valid credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node agent, by node name: may ask for its own pods' identities.
    Node(String),
    /// The relay's service account: may ask for the relay's own identity only.
    Relay(ObjectName),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(n) => f.write_str(n),
            Self::Relay(sa) => write!(f, "relay {sa}"),
        }
    }
}

/// The one identity the relay's service account may get: `spiffe://<td>/ns/<ns>/sa/<name>`.
pub fn relay_id(
    trust_domain: &str,
    account: &ObjectName,
) -> Result<SpiffeId, super::SpiffeIdError> {
    SpiffeId::new(trust_domain, &account.namespace, &account.name)
}

/// Whether the relay's service account `account` may get `id`: only when `id` is exactly the
/// relay's own (`spiffe://<trust_domain>/ns/<ns>/sa/<name>` of `account`). istiod's rule for any
/// workload (the token's account must be the id's) narrowed to the one account that is not a
/// node; a node agent's token never reaches this rule.
pub fn authorize_relay(
    account: &ObjectName,
    trust_domain: &str,
    id: &SpiffeId,
) -> Result<(), Refusal> {
    let allowed = relay_id(trust_domain, account)
        .map_err(|e| Refusal::Denied(format!("relay account {account}: {e}")))?;
    if *id != allowed {
        return Err(Refusal::Denied(format!(
            "the relay's service account {account} may get only {allowed}, not {id}"
        )));
    }
    Ok(())
}

/// How the CA authenticates nodes and authorizes their requests.
#[derive(Clone)]
pub enum NodeAuth {
    Static(StaticAuth),
    Kubernetes(KubeAuth),
}

impl NodeAuth {
    /// The node (or the relay) a bearer token belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Unauthenticated> {
        match self {
            Self::Static(s) => s.authenticate(token).map(Caller::Node),
            Self::Kubernetes(k) => k.authenticate(token).await,
        }
    }

    /// Whether `node` may get a certificate for `id` on behalf of pod `pod`.
    pub async fn authorize(
        &self,
        node: &str,
        pod: &ObjectName,
        id: &SpiffeId,
    ) -> Result<(), Refusal> {
        if pod.namespace != id.namespace() {
            return Err(Refusal::Denied(format!(
                "pod {pod} is not in namespace {} of {id}",
                id.namespace()
            )));
        }
        match self {
            Self::Static(s) => s.authorize(node, pod, id),
            Self::Kubernetes(k) => k.authorize(node, pod, id).await,
        }
    }
}

/// SHA-256 of a token, hex: what the token file stores (a stolen file yields no token).
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A new bootstrap token for `node`: 32 random bytes, hex, prefixed `kmbt.` so a leaked one is
/// recognisable. Its hash is appended to `file` (created 0600), the token itself is only returned.
pub fn bootstrap(file: &Path, node: &str) -> Result<String, std::io::Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if node.is_empty() || node.contains(char::is_whitespace) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("node name {node:?} is empty or has whitespace"),
        ));
    }
    let mut secret = [0u8; 32];
    super::random_bytes(&mut secret);
    let token = format!("kmbt.{}", hex(&secret));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)?;
    writeln!(f, "{} {node}", token_hash(&token))?;
    f.sync_all()?;
    Ok(token)
}

/// The static file as last parsed, with the modification time it had.
type ParsedPods = (SystemTime, Arc<ClusterModel>);

/// Static mode: bootstrap tokens and the static cluster file's pods.
#[derive(Clone)]
pub struct StaticAuth {
    tokens: PathBuf,
    pods: PathBuf,
    /// The last parsed pods file, by modification time: reparsed only when it changes.
    cache: Arc<Mutex<Option<ParsedPods>>>,
}

impl StaticAuth {
    #[must_use]
    pub fn new(tokens: PathBuf, pods: PathBuf) -> Self {
        Self {
            tokens,
            pods,
            cache: Arc::default(),
        }
    }

    /// The token file is read on every request, so removing a line revokes at once.
    fn authenticate(&self, token: &str) -> Result<String, Unauthenticated> {
        let text = std::fs::read_to_string(&self.tokens).map_err(|e| {
            Unauthenticated(format!("bootstrap tokens {}: {e}", self.tokens.display()))
        })?;
        let want = token_hash(token);
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(h, _)| constant_time_eq(h.as_bytes(), want.as_bytes()))
            .map(|(_, node)| node.trim().to_owned())
            .ok_or_else(|| Unauthenticated("unknown bootstrap token".to_owned()))
    }

    fn model(&self) -> Result<Arc<ClusterModel>, Refusal> {
        let unavailable = |e: String| Refusal::Unavailable(format!("{}: {e}", self.pods.display()));
        let mtime = std::fs::metadata(&self.pods)
            .and_then(|m| m.modified())
            .map_err(|e| unavailable(e.to_string()))?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((t, m)) = cache.as_ref()
            && *t == mtime
        {
            return Ok(Arc::clone(m));
        }
        // Any node name: the CA reads every node's pods.
        let model = Arc::new(
            crate::discovery::file::load(&self.pods, Some("-"))
                .map_err(|e| unavailable(e.to_string()))?,
        );
        *cache = Some((mtime, Arc::clone(&model)));
        Ok(model)
    }

    fn authorize(&self, node: &str, pod: &ObjectName, id: &SpiffeId) -> Result<(), Refusal> {
        let model = self.model()?;
        let p = model
            .pods
            .get(pod)
            .ok_or_else(|| Refusal::Denied(format!("pod {pod} is not in the static file")))?;
        check_pod(node, pod, &p.node, &p.service_account, id)
    }
}

/// Compares hashes without an early exit (both are hex digests of the same length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_pod(
    node: &str,
    pod: &ObjectName,
    on: &str,
    sa: &str,
    id: &SpiffeId,
) -> Result<(), Refusal> {
    if on != node {
        return Err(Refusal::Denied(format!(
            "pod {pod} is scheduled on node {on:?}, not on the requesting node {node}"
        )));
    }
    if sa != id.service_account() {
        return Err(Refusal::Denied(format!(
            "pod {pod} runs as service account {sa:?}, not {}",
            id.service_account()
        )));
    }
    Ok(())
}

/// Kubernetes mode.
#[derive(Clone)]
pub struct KubeAuth {
    client: kube::Client,
    /// `system:serviceaccount:<ns>:<name>` of the node agents.
    agent_user: String,
    /// The relay's account and its `system:serviceaccount:<ns>:<name>`, when the rule is on.
    relay: Option<(ObjectName, String)>,
}

impl KubeAuth {
    /// `agent_sa` is `<namespace>/<name>` of the agents' service account.
    #[must_use]
    pub fn new(client: kube::Client, agent_sa: &ObjectName) -> Self {
        Self {
            client,
            agent_user: format!(
                "system:serviceaccount:{}:{}",
                agent_sa.namespace, agent_sa.name
            ),
            relay: None,
        }
    }

    /// Also accepts tokens of the relay's account `relay_sa` (`namespace/name`), for the relay's
    /// own identity only.
    #[must_use]
    pub fn with_relay(mut self, relay_sa: &ObjectName) -> Self {
        self.relay = Some((
            relay_sa.clone(),
            format!(
                "system:serviceaccount:{}:{}",
                relay_sa.namespace, relay_sa.name
            ),
        ));
        self
    }

    async fn authenticate(&self, token: &str) -> Result<Caller, Unauthenticated> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![CA_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let reviewed = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| Unauthenticated(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Unauthenticated(format!(
                "token not authenticated: {}",
                status.error.unwrap_or_else(|| "no reason given".to_owned())
            )));
        }
        if let Some(aud) = &status.audiences
            && !aud.iter().any(|a| a == CA_AUDIENCE)
        {
            return Err(Unauthenticated(format!(
                "token is not for audience {CA_AUDIENCE} (audiences {aud:?})"
            )));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        if let Some((account, relay_user)) = &self.relay
            && name == *relay_user
        {
            return Ok(Caller::Relay(account.clone()));
        }
        if name != self.agent_user {
            return Err(Unauthenticated(match &self.relay {
                Some((_, relay_user)) => format!(
                    "token belongs to {name:?}, neither the node agents' {} nor the relay's {relay_user}",
                    self.agent_user
                ),
                None => format!(
                    "token belongs to {name:?}, not the node agents' {}",
                    self.agent_user
                ),
            }));
        }
        let extra: BTreeMap<String, Vec<String>> = user.extra.unwrap_or_default();
        match extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
            Some([node]) if !node.is_empty() => Ok(Caller::Node(node.clone())),
            _ => Err(Unauthenticated(format!(
                "token carries no {NODE_NAME_EXTRA} (not a pod-bound projected token)"
            ))),
        }
    }

    async fn authorize(&self, node: &str, pod: &ObjectName, id: &SpiffeId) -> Result<(), Refusal> {
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &pod.namespace);
        // A 404 by code, not only by reason: stand-ins (kmock) answer 404 with another reason.
        let found = match api.get(&pod.name).await {
            Ok(p) => p,
            Err(kube::Error::Api(s)) if s.code == 404 || s.is_not_found() => {
                return Err(Refusal::Denied(format!("pod {pod} does not exist")));
            }
            Err(e) => return Err(Refusal::Unavailable(format!("reading pod {pod}: {e}"))),
        };
        let spec = found.spec.unwrap_or_default();
        let on = spec.node_name.unwrap_or_default();
        // The API server defaults an unset service account to `default`.
        let sa = spec
            .service_account_name
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        check_pod(node, pod, &on, &sa, id)
    }
}

/// A Kubernetes client from a kubeconfig file, or the in-cluster/default configuration.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, kube::Error> {
    match kubeconfig {
        None => kube::Client::try_default().await,
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(kube::Error::InferKubeconfig)?;
            kube::Client::try_from(config)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_account_gets_its_own_id_only() {
        let account = ObjectName::new("mesh-system", "mesh-relay");
        let own = SpiffeId::new("cluster.local", "mesh-system", "mesh-relay").unwrap();
        authorize_relay(&account, "cluster.local", &own).unwrap();
        for other in [
            SpiffeId::new("cluster.local", "mesh-system", "mesh-agent").unwrap(),
            SpiffeId::new("cluster.local", "shop", "mesh-relay").unwrap(),
            SpiffeId::new("other.domain", "mesh-system", "mesh-relay").unwrap(),
        ] {
            let Err(Refusal::Denied(reason)) = authorize_relay(&account, "cluster.local", &other)
            else {
                panic!("{other} allowed");
            };
            assert_eq!(
                reason,
                format!(
                    "the relay's service account mesh-system/mesh-relay may get only {own}, not {other}"
                )
            );
        }
    }
}
