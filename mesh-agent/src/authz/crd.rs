//! The manifests generated from the security types: the `AuthorizationPolicy` and
//! `PeerAuthentication` CRDs (schemas and CEL rules from `types`). `deploy/` holds the committed
//! copies; `mesh-agent/tests/authz_crd.rs` fails when they differ from this output and rewrites
//! them under `KERNMESH_UPDATE_MANIFESTS=1`.

use kube::CustomResourceExt as _;
use serde_json::Value;

use super::types::{AuthorizationPolicy, PeerAuthentication};
use crate::policy::crd::CrdError;

/// Header of every generated file.
pub const GENERATED_HEADER: &str = "# Generated from mesh-agent/src/authz/types.rs; do not edit. Regenerate with\n# KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test authz_crd\n";

/// The `AuthorizationPolicy` CRD as JSON.
pub fn authorization_crd() -> Result<Value, CrdError> {
    serde_json::to_value(AuthorizationPolicy::crd()).map_err(|source| CrdError::Json {
        what: "AuthorizationPolicy CustomResourceDefinition",
        source,
    })
}

/// The `PeerAuthentication` CRD as JSON.
pub fn peer_authentication_crd() -> Result<Value, CrdError> {
    serde_json::to_value(PeerAuthentication::crd()).map_err(|source| CrdError::Json {
        what: "PeerAuthentication CustomResourceDefinition",
        source,
    })
}

fn yaml(what: &'static str, v: &Value) -> Result<String, CrdError> {
    serde_saphyr::to_string(v).map_err(|source| CrdError::Yaml { what, source })
}

/// `deploy/kubernetes/security-crds.yaml` (and the chart's `crds/`): both CRDs.
pub fn crds_yaml() -> Result<String, CrdError> {
    Ok(format!(
        "{GENERATED_HEADER}{}---\n{}",
        yaml("AuthorizationPolicy CRD", &authorization_crd()?)?,
        yaml("PeerAuthentication CRD", &peer_authentication_crd()?)?
    ))
}
