//! The gateway's `RoutePolicy` custom resource (`gateway.kernmesh.io/v1alpha1`): the types the
//! route compiler parses (from the routes file or the API server) and from which the CRD in
//! `deploy/` is generated (`mesh-agent/tests/route_policy_crd.rs` checks the committed copies;
//! `KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test route_policy_crd` rewrites them).

use std::path::PathBuf;

use kube::{CustomResource, CustomResourceExt as _, KubeSchema};
use serde::{Deserialize, Serialize};

/// Header of the generated CRD file.
pub const GENERATED_HEADER: &str = "# Generated from mesh-agent/src/gateway/route_policy.rs; do not edit. Regenerate with\n# KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test route_policy_crd\n";

/// The CRD file (`deploy/kubernetes/routepolicy-crd.yaml`, the chart's `crds/`).
pub fn crd_yaml() -> Result<String, crate::policy::crd::CrdError> {
    let v = serde_json::to_value(RoutePolicy::crd()).map_err(|source| {
        crate::policy::crd::CrdError::Json {
            what: "CustomResourceDefinition",
            source,
        }
    })?;
    let text =
        serde_saphyr::to_string(&v).map_err(|source| crate::policy::crd::CrdError::Yaml {
            what: "CustomResourceDefinition",
            source,
        })?;
    Ok(format!("{GENERATED_HEADER}{text}"))
}

/// Our own policy kind: JWT, rate limits and retries per route, attached to `HTTPRoute`s and
/// `GRPCRoute`s by `targetRefs` (GEP-713). Envoy Gateway splits these into `SecurityPolicy` and
/// `BackendTrafficPolicy`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[kube(
    group = "gateway.kernmesh.io",
    version = "v1alpha1",
    kind = "RoutePolicy",
    plural = "routepolicies",
    singular = "routepolicy",
    namespaced,
    category = "kernmesh"
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicySpec {
    /// The routes it applies to: `HTTPRoute`s or `GRPCRoute`s of the policy's namespace, by
    /// name; a route takes at most one `RoutePolicy`.
    pub target_refs: Vec<PolicyTargetRef>,
    /// Requests must carry a valid bearer JWT (else 401; claims not matched: 403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
    /// Token buckets per route and per client address (over the limit: 429).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Retries of idempotent requests (Istio's defaults otherwise).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
/// A route the policy applies to.
pub struct PolicyTargetRef {
    /// `gateway.networking.k8s.io` (or empty).
    #[serde(default)]
    pub group: Option<String>,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// The route's name, in the policy's namespace.
    pub name: String,
}

/// `spec.jwt` (Envoy Gateway's `SecurityPolicy.jwt.providers[]` with `localJWKS`, and its
/// `authorization.rules[].principal.jwt.claims`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtSpec {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Keys from a file (reloaded with the routes). One of `jwksFile` and `jwksUri`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Keys from an `https://` URL (Envoy Gateway's `remoteJWKS.uri`), cached, refreshed every
    /// `jwksRefresh` and when a token names an unknown `kid` (at most every 10 s); the last good
    /// keys stay when a fetch fails.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// CA certificates (PEM) that `jwksUri`'s server must chain to; unset: the system's roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// How often `jwksUri` is fetched again (Gateway API duration; default 5m, Envoy Gateway's
    /// `cacheDuration`).
    #[serde(default)]
    pub jwks_refresh: Option<String>,
    /// Every entry must hold; an entry holds when the claim has one of the values.
    #[serde(default)]
    pub claims: Vec<ClaimSpec>,
}

/// A JWT claim and the values it may have.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct ClaimSpec {
    pub name: String,
    pub values: Vec<String>,
}

/// Rate limits of a route.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// One bucket for the whole route.
    #[serde(default)]
    pub route: Option<RateSpec>,
    /// One bucket per client address.
    #[serde(default)]
    pub client: Option<RateSpec>,
}

/// `requests` per `per` (a Gateway API duration, e.g. `1s`, `1m`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// Requests allowed per period (also the burst).
    pub requests: u32,
    /// The period.
    pub per: String,
}

/// Retries of a rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts after the first (Istio's default 2).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Retries in flight at most this share of requests in flight (Envoy's budget, 20).
    #[serde(default)]
    pub budget_percent: Option<u32>,
    /// Base backoff between attempts (Gateway API duration, jittered).
    #[serde(default)]
    pub backoff: Option<String>,
}
