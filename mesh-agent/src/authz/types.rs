//! The `AuthorizationPolicy` and `PeerAuthentication` custom resources
//! (`security.kernmesh.io/v1alpha1`): Rust types from which the CRDs, their `OpenAPI` schemas and
//! CEL rules are generated. Istio's shapes, cut to what an L4 data path can enforce.
//!
//! As in `policy::types`, the types stay close to the wire (enumerations are strings, ports are
//! strings as in Istio) so that a value the schema would refuse still deserializes and
//! [`super::parse`] names the field and the reason. Istio's L7 fields (`methods`, `paths`,
//! `requestPrincipals`, …) are declared, so that an object using them is *refused* with a clear
//! reason, both at admission (a CEL rule) and by the parser — never silently pruned by the API
//! server's structural schema or ignored by the agent.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::policy::types::TrafficPolicyStatus;

/// API group of the security resources.
pub const GROUP: &str = "security.kernmesh.io";
/// Version of both kinds.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of both kinds.
pub const API_VERSION: &str = "security.kernmesh.io/v1alpha1";
/// Kind of the authorization policy.
pub const AUTHZ_KIND: &str = "AuthorizationPolicy";
/// Kind of the peer authentication.
pub const PEER_AUTHN_KIND: &str = "PeerAuthentication";
/// Most rules, sources, operations and values per list (bounds keep CEL costs estimable).
pub const MAX_ITEMS: usize = 64;
/// Longest principal or namespace pattern.
pub const MAX_VALUE: usize = 512;
/// The message every L7 field is refused with.
pub const L7_REFUSAL: &str =
    "L7 fields are not supported by this L4 policy (Istio ambient needs a waypoint proxy for them)";

/// Which workloads a policy applies to: pods of the policy's namespace whose labels include all
/// of `matchLabels` (in the root namespace: pods of every namespace). Absent: every pod of the
/// namespace (root namespace: of the mesh).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a pod must carry, all of them.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 64))]
    pub match_labels: BTreeMap<String, String>,
}

/// Who may (ALLOW) or may not (DENY) connect to the selected workloads, by source identity and
/// destination port: the L4 subset of Istio's `AuthorizationPolicy`. Evaluation as Istio: any
/// matching DENY denies; then, if any ALLOW policy selects the workload, one must match.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.kernmesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    singular = "authorizationpolicy",
    category = "kernmesh",
    namespaced,
    status = "TrafficPolicyStatus",
    derive = "PartialEq",
    doc = "L4 authorization (Istio's AuthorizationPolicy subset) for mesh workloads (kernmesh).",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; absent = the whole namespace (root namespace: the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (default) or `DENY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self in ['ALLOW', 'DENY']").message("action must be ALLOW or DENY (AUDIT and CUSTOM are not supported)"))]
    pub action: Option<String>,
    /// A connection matches the policy if it matches any rule. An ALLOW policy without rules
    /// allows nothing; `rules: [{}]` matches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub rules: Option<Vec<AuthzRule>>,
}

/// One rule: every present part must match (`from` any of its sources, `to` any of its
/// operations).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.when)").message("when: conditions are not supported by this L4 policy; use from and to"))]
pub struct AuthzRule {
    /// Sources; absent = any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub from: Option<Vec<RuleFrom>>,
    /// Operations; absent = any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub to: Option<Vec<RuleTo>>,
    /// Istio's conditions: refused (declared so it is refused rather than pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub when: Option<Vec<Condition>>,
}

/// Istio's `Condition` (`when[]`): declared with Istio's shape only to be refused.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[schemars(length(max = 256))]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_values: Option<Vec<String>>,
}

/// `from[]`: one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

/// `to[]`: one operation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

/// Istio's `Source`, L4 part. Principals are `<trust-domain>/ns/<ns>/sa/<sa>` (a leading
/// `spiffe://` is accepted); principals and namespaces match exactly, by prefix (`abc*`), by
/// suffix (`*abc`) or anything authenticated (`*`). Both need an authenticated (mTLS) peer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.requestPrincipals) && !has(self.notRequestPrincipals)").message("requestPrincipals: L7 fields are not supported by this L4 policy"))]
#[x_kube(validation = Rule::new("!has(self.ipBlocks) && !has(self.notIpBlocks) && !has(self.remoteIpBlocks) && !has(self.notRemoteIpBlocks)").message("ipBlocks are not supported yet; use principals or namespaces"))]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(p, size(p) > 0 && size(p) <= 512)").message("principals must be non-empty strings of at most 512 characters"))]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(p, size(p) > 0 && size(p) <= 512)").message("notPrincipals must be non-empty strings of at most 512 characters"))]
    pub not_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(p, size(p) > 0 && size(p) <= 512)").message("namespaces must be non-empty strings of at most 512 characters"))]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(p, size(p) > 0 && size(p) <= 512)").message("notNamespaces must be non-empty strings of at most 512 characters"))]
    pub not_namespaces: Option<Vec<String>>,
    /// L7 (JWT): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub request_principals: Option<Vec<String>>,
    /// L7 (JWT): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_request_principals: Option<Vec<String>>,
    /// Not supported yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub ip_blocks: Option<Vec<String>>,
    /// Not supported yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_ip_blocks: Option<Vec<String>>,
    /// Not supported yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub remote_ip_blocks: Option<Vec<String>>,
    /// Not supported yet: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// Istio's `Operation`, L4 part: destination ports (strings, as Istio: `"8080"`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.methods) && !has(self.notMethods) && !has(self.paths) && !has(self.notPaths) && !has(self.hosts) && !has(self.notHosts)").message("methods, paths, hosts: L7 fields are not supported by this L4 policy"))]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 8)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[0-9]{1,5}$') && int(p) >= 1 && int(p) <= 65535)").message("ports must be port numbers 1..=65535 as strings"))]
    pub ports: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 8)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[0-9]{1,5}$') && int(p) >= 1 && int(p) <= 65535)").message("notPorts must be port numbers 1..=65535 as strings"))]
    pub not_ports: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub methods: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_methods: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub paths: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_paths: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub hosts: Option<Vec<String>>,
    /// L7: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub not_hosts: Option<Vec<String>>,
}

/// Whether mesh workloads must receive mTLS only (`STRICT`) or also plaintext (`PERMISSIVE`,
/// the default). Istio's precedence: a workload policy (selector) beats the namespace's, which
/// beats the mesh-wide one (root namespace, no selector).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.kernmesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    singular = "peerauthentication",
    category = "kernmesh",
    namespaced,
    status = "TrafficPolicyStatus",
    derive = "PartialEq",
    doc = "Whether mesh workloads accept plaintext (kernmesh; Istio's PeerAuthentication).",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.portLevelMtls)").message("portLevelMtls is not supported yet"))]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to; absent = the whole namespace (root namespace: the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode; absent = inherit (Istio's `UNSET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Istio's per-port modes: refused (declared so it is refused rather than pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

/// `mtls`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    /// `STRICT`, `PERMISSIVE` or `UNSET` (inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self in ['STRICT', 'PERMISSIVE', 'UNSET']").message("mode must be STRICT, PERMISSIVE or UNSET (DISABLE: label the workload kernmesh.io/dataplane-mode=none instead)"))]
    pub mode: Option<String>,
}
