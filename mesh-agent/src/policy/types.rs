//! The `TrafficPolicy` custom resource (`traffic.kernmesh.io/v1alpha1`): Rust types from which
//! the CRD, its `OpenAPI` schema and its CEL admission rules are generated.
//!
//! Every string and list is bounded (`maxLength`, `maxItems`): the API server estimates a CEL
//! rule's cost from those bounds and refuses a CRD whose rules could exceed its budget.
//!
//! The types stay close to the wire: enumerations are strings and numbers are wide, so that a
//! value the schema would refuse still deserializes and [`super::parse`] can name the field and
//! the reason (the static file has no admission step, and a cluster may hold objects written
//! before a rule existed). Unknown fields are refused (`deny_unknown_fields`), per object: a
//! policy using a field this agent does not know is rejected rather than half-applied.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of every kernmesh resource.
pub const GROUP: &str = "traffic.kernmesh.io";
/// Version of [`TrafficPolicy`].
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of [`TrafficPolicy`].
pub const API_VERSION: &str = "traffic.kernmesh.io/v1alpha1";
/// Kind of the policy.
pub const KIND: &str = "TrafficPolicy";
/// Smallest Maglev table (Istio's `maglev.tableSize` must be a prime; the kernel table holds at
/// most 131,071 entries).
pub const MIN_TABLE_SIZE: u64 = 1021;
/// Largest Maglev table.
pub const MAX_TABLE_SIZE: u64 = 131_071;

/// The CEL rule proving `tableSize` prime: trial division by every prime up to
/// √131,071 ≈ 362 (the range check keeps the value above them, so none divides a prime).
pub const TABLE_SIZE_PRIME_RULE: &str = "[2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, \
47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, \
151, 157, 163, 167, 173, 179, 181, 191, 193, 197, 199, 211, 223, 227, 229, 233, 239, 241, 251, \
257, 263, 269, 271, 277, 281, 283, 293, 307, 311, 313, 317, 331, 337, 347, 349, 353, 359].all(p, \
self % p != 0)";

/// Load balancing, connection limits and outlier detection for the Services it targets.
/// Modelled on Istio's `DestinationRule.trafficPolicy`; attached as a Gateway API policy
/// (GEP-713): a Service-targeted policy beats a Namespace-targeted one, and between equals the
/// oldest wins.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "traffic.kernmesh.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    singular = "trafficpolicy",
    shortname = "tp",
    category = "kernmesh",
    namespaced,
    status = "TrafficPolicyStatus",
    derive = "PartialEq",
    doc = "Load balancing, connection limits and outlier detection for Services (kernmesh).",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// What the policy applies to: Services by name, or every Service of the policy's own
    /// namespace (`kind: Namespace`, `name` = that namespace).
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, a.kind == b.kind && a.name == b.name))").message("targetRefs must not name the same target twice"))]
    pub target_refs: Vec<TargetRef>,
    /// Load-balancing algorithm (default: RANDOM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints (Envoy's outlier detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// A Gateway API `LocalPolicyTargetReference`: a Service, or the policy's own Namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group of the target: always `""` (the core group).
    #[serde(default)]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self == ''").message("group must be \"\" (the core API group)"))]
    pub group: String,
    /// `Service` or `Namespace`.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self == 'Service' || self == 'Namespace'").message("kind must be Service or Namespace"))]
    pub kind: String,
    /// Name of the Service, or of the policy's own namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Istio's `LoadBalancerSettings`: exactly one of `simple` and `consistentHash`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.simple) != has(self.consistentHash)").message("set exactly one of simple and consistentHash"))]
pub struct LoadBalancer {
    /// `RANDOM`, `ROUND_ROBIN`, `LEAST_REQUEST` (power of two choices, fewest active
    /// connections) or `WEIGHTED` (by endpoint weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self in ['RANDOM', 'ROUND_ROBIN', 'LEAST_REQUEST', 'WEIGHTED']").message("simple must be RANDOM, ROUND_ROBIN, LEAST_REQUEST or WEIGHTED"))]
    pub simple: Option<String>,
    /// Consistent hashing (Maglev), so a client keeps reaching the same endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

/// Istio's `ConsistentHashLB`; only `maglev` is offered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    /// Maglev hashing.
    pub maglev: Maglev,
}

/// Istio's `ConsistentHashLB.MagLev`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    /// Lookup-table entries: a prime in 1021..=131071 (default: chosen from the endpoint count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1021 && self <= 131071").message("tableSize must be in 1021..=131071"))]
    #[x_kube(validation = Rule::new(TABLE_SIZE_PRIME_RULE).message("tableSize must be a prime"))]
    pub table_size: Option<i64>,
}

/// Connection limits (Istio: `connectionPool.tcp.maxConnections`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Connections per endpoint; 0 or absent = unlimited (Istio's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 4294967295").message("maxConnections must be in 0..=4294967295"))]
    pub max_connections: Option<i64>,
}

/// Envoy's outlier detection, with Envoy's field names.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.maxEjectionTime) || duration(self.maxEjectionTime) >= duration(has(self.baseEjectionTime) ? self.baseEjectionTime : '30s')").message("maxEjectionTime must not be shorter than baseEjectionTime (default 30s)"))]
pub struct OutlierDetection {
    /// Consecutive failures before an endpoint is ejected (Envoy's
    /// `consecutive_gateway_failure`, default 5); 0 = never eject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 4294967295").message("consecutiveFailures must be in 0..=4294967295"))]
    pub consecutive_failures: Option<i64>,
    /// First ejection (default `30s`); later ones last this × times ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$') && duration(self) > duration('0s')").message("baseEjectionTime must be a duration longer than 0s, like 30s, 1m30s or 500ms"))]
    pub base_ejection_time: Option<String>,
    /// Longest one ejection (default `300s`, or `baseEjectionTime` when that is longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$') && duration(self) > duration('0s')").message("maxEjectionTime must be a duration longer than 0s, like 300s or 5m"))]
    pub max_ejection_time: Option<String>,
    /// Most endpoints of a Service ejected at once, in percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxEjectionPercent must be in 0..=100"))]
    pub max_ejection_percent: Option<i64>,
    /// Below this share of healthy endpoints, balance over all of them (Envoy's
    /// `healthy_panic_threshold`, default 50); 0 = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("healthyPanicThreshold must be in 0..=100"))]
    pub healthy_panic_threshold: Option<i64>,
}

/// What the elected agent reports about a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    /// `Accepted` (True/False) with a reason: `Accepted`, `Invalid`, `Conflicted`,
    /// `TargetNotFound`.
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
}

/// A `metav1.Condition`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    pub reason: String,
    /// What a person needs to know.
    #[serde(default)]
    pub message: String,
    /// `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
}
