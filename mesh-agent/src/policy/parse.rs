//! The one parser and validator of `TrafficPolicy` objects, used by every source (the
//! Kubernetes watch and the static file's `policies:` list): same checks, same messages.
//!
//! A policy is valid or rejected as a whole: [`parse`] never returns settings from a policy with
//! a problem, so a bad field cannot half-apply. Every problem is listed, each naming its field
//! (`spec.outlierDetection.maxEjectionPercent`) and the reason. The checks are those of the CRD's
//! schema and CEL rules (see `types`), plus the one CEL cannot express on a custom resource
//! (a `Namespace` target must be the policy's own namespace; admission checks it with the
//! `ValidatingAdmissionPolicy` shipped next to the CRD).

use std::{fmt, time::Duration};

use serde_json::Value;

use super::types::{
    API_VERSION, ConnectionPool, KIND, LoadBalancer, MAX_TABLE_SIZE, MIN_TABLE_SIZE,
    OutlierDetection, TargetRef, TrafficPolicy,
};
use crate::{
    datapath::spec::{
        Algorithm, CircuitSettings, DEFAULT_BASE_EJECTION, DEFAULT_CONSECUTIVE_FAILURES,
        DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_EJECTION, DEFAULT_MAX_EJECTION_PERCENT,
        DEFAULT_PANIC_THRESHOLD_PERCENT,
    },
    model::{ObjectName, ServiceSettings},
};

/// Namespace of a policy that names none (the static file; as `kubectl apply` without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Most targets of one policy (the schema's `maxItems`).
pub const MAX_TARGETS: usize = 16;
/// Longest target name (a DNS subdomain; the schema's `maxLength`).
pub const MAX_NAME: usize = 253;
/// Longest duration text (the schema's `maxLength`).
pub const MAX_DURATION_TEXT: usize = 32;
/// Longest value quoted in a message (Events allow 1 kB of note).
const MAX_QUOTED: usize = 60;

/// What a policy may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKind {
    /// One Service, by name, in the policy's namespace.
    Service,
    /// Every Service of the policy's namespace.
    Namespace,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "Service",
            Self::Namespace => "Namespace",
        })
    }
}

/// A target, resolved to the object it names: for a Service `namespace/name`, for a Namespace
/// `""/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub kind: TargetKind,
    pub object: ObjectName,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TargetKind::Service => write!(f, "Service {}", self.object),
            TargetKind::Namespace => write!(f, "Namespace {}", self.object.name),
        }
    }
}

/// The settings a valid policy gives the services it applies to: every field, with Envoy's and
/// Istio's defaults where the policy sets none (a winning policy replaces, it does not merge).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    pub algorithm: Algorithm,
    /// Maglev table size; `None` = chosen by the data path.
    pub table_size: Option<u32>,
    pub circuit: CircuitSettings,
}

impl PolicySettings {
    /// Writes these settings into a service's (its affinity, from the Service, stays).
    pub fn apply(&self, s: &mut ServiceSettings) {
        s.algorithm = self.algorithm;
        s.table_size = self.table_size;
        s.circuit = self.circuit;
    }
}

/// One problem of a policy: its field and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FieldProblem {
    /// Path of the field (`spec.targetRefs[1].kind`); empty for the object as a whole.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// A rejected policy: which object, and every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub policy: ObjectName,
    pub problems: Vec<FieldProblem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrafficPolicy {}: ", self.policy)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        f.write_str("; rejected as a whole")
    }
}

/// A policy as a source read it: its identity, what it targets (best effort when invalid, so
/// `meshctl policies` can show a rejected policy next to the services it names) and either its
/// settings or why it is rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPolicy {
    pub name: ObjectName,
    /// `metadata.creationTimestamp` as written (RFC 3339 in UTC, so it sorts by time); `None`
    /// in a static file that gives none.
    pub created: Option<String>,
    /// `metadata.generation` (for `status.conditions[].observedGeneration`).
    pub generation: Option<i64>,
    pub targets: Vec<Target>,
    pub outcome: Result<PolicySettings, PolicyError>,
}

impl ParsedPolicy {
    /// Precedence between policies of the same level: older first, then by name (the Gateway
    /// API's conflict rule). A policy without a timestamp sorts as the oldest.
    #[must_use]
    pub fn age_key(&self) -> (Option<&str>, &ObjectName) {
        (self.created.as_deref(), &self.name)
    }
}

/// Parses and validates one `TrafficPolicy` object (the whole object: `apiVersion`, `kind`,
/// `metadata`, `spec`).
#[must_use]
pub fn parse(object: &Value) -> ParsedPolicy {
    let meta = object.get("metadata");
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let name = ObjectName::new(
        text(meta.and_then(|m| m.get("namespace"))).unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        text(meta.and_then(|m| m.get("name"))).unwrap_or_default(),
    );
    let created = text(meta.and_then(|m| m.get("creationTimestamp")));
    let generation = meta
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64);
    let mut problems = Vec::new();
    let mut problem = |field: &str, reason: String| {
        problems.push(FieldProblem {
            field: field.to_owned(),
            reason,
        });
    };
    if name.name.is_empty() {
        problem("metadata.name", "is required".to_owned());
    }
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => problem(
            "apiVersion",
            format!("{} is not {API_VERSION}", quote_opt(other)),
        ),
    }
    match object.get("kind").and_then(Value::as_str) {
        Some(KIND) => {}
        other => problem("kind", format!("{} is not {KIND}", quote_opt(other))),
    }
    // The status is the elected agent's output, not input: a static file may carry one (a
    // `kubectl get -o yaml` copy) and it must not make the object fail.
    let mut without_status = object.clone();
    if let Some(map) = without_status.as_object_mut() {
        map.remove("status");
    }
    let typed: Option<TrafficPolicy> = match serde_path_to_error::deserialize(&without_status) {
        Ok(p) => Some(p),
        Err(e) => {
            let path = e.path().to_string();
            let reason = e.into_inner().to_string();
            let field = if path == "." { String::new() } else { path };
            problem(&field, reason);
            None
        }
    };
    let Some(policy) = typed else {
        return ParsedPolicy {
            targets: loose_targets(object, &name.namespace),
            name: name.clone(),
            created,
            generation,
            outcome: Err(PolicyError {
                policy: name,
                problems,
            }),
        };
    };
    let mut v = Validator {
        problems,
        namespace: &name.namespace,
    };
    let targets = v.targets(&policy.spec.target_refs);
    let (algorithm, table_size) = v.load_balancer(policy.spec.load_balancer.as_ref());
    let max_connections = v.connection_pool(policy.spec.connection_pool.as_ref());
    let circuit = v.outlier_detection(policy.spec.outlier_detection.as_ref(), max_connections);
    let outcome = if v.problems.is_empty() {
        Ok(PolicySettings {
            algorithm,
            table_size,
            circuit,
        })
    } else {
        Err(PolicyError {
            policy: name.clone(),
            problems: v.problems,
        })
    };
    ParsedPolicy {
        name,
        created,
        generation,
        targets,
        outcome,
    }
}

/// Targets of an object that did not deserialize, read field by field (for reporting only).
fn loose_targets(object: &Value, namespace: &str) -> Vec<Target> {
    let refs = object
        .pointer("/spec/targetRefs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    refs.iter()
        .filter_map(|r| {
            let name = r.get("name")?.as_str()?;
            let kind = match r.get("kind")?.as_str()? {
                "Service" => TargetKind::Service,
                "Namespace" => TargetKind::Namespace,
                _ => return None,
            };
            Some(target(kind, namespace, name))
        })
        .collect()
}

fn target(kind: TargetKind, namespace: &str, name: &str) -> Target {
    Target {
        kind,
        object: match kind {
            TargetKind::Service => ObjectName::new(namespace, name),
            TargetKind::Namespace => ObjectName::new("", name),
        },
    }
}

fn quote_opt(v: Option<&str>) -> String {
    v.map_or_else(|| "absent".to_owned(), quote)
}

/// `"value"`, cut to [`MAX_QUOTED`] characters.
fn quote(v: &str) -> String {
    let mut s: String = v.chars().take(MAX_QUOTED).collect();
    if s.len() < v.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// Collects the problems of one typed policy.
struct Validator<'a> {
    problems: Vec<FieldProblem>,
    namespace: &'a str,
}

impl Validator<'_> {
    fn problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(FieldProblem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn targets(&mut self, refs: &[TargetRef]) -> Vec<Target> {
        if refs.is_empty() {
            self.problem("spec.targetRefs", "needs at least one target");
        }
        if refs.len() > MAX_TARGETS {
            self.problem(
                "spec.targetRefs",
                format!("has {} targets; at most {MAX_TARGETS}", refs.len()),
            );
        }
        let mut out: Vec<Target> = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let at = |f: &str| format!("spec.targetRefs[{i}].{f}");
            if !r.group.is_empty() {
                self.problem(
                    at("group"),
                    format!(
                        "{} is not \"\" (Service and Namespace are in the core group)",
                        quote(&r.group)
                    ),
                );
            }
            if r.name.is_empty() {
                self.problem(at("name"), "is required");
                continue;
            }
            if r.name.len() > MAX_NAME {
                self.problem(at("name"), format!("is longer than {MAX_NAME} characters"));
                continue;
            }
            let kind = match r.kind.as_str() {
                "Service" => TargetKind::Service,
                "Namespace" => TargetKind::Namespace,
                other => {
                    self.problem(
                        at("kind"),
                        format!("{} is not Service or Namespace", quote(other)),
                    );
                    continue;
                }
            };
            if kind == TargetKind::Namespace && r.name != self.namespace {
                self.problem(
                    at("name"),
                    format!(
                        "Namespace {} is not the policy's own namespace {}",
                        quote(&r.name),
                        quote(self.namespace)
                    ),
                );
                continue;
            }
            let t = target(kind, self.namespace, &r.name);
            if out.contains(&t) {
                self.problem(at("name"), format!("{t} is already a target"));
                continue;
            }
            out.push(t);
        }
        out
    }

    fn load_balancer(&mut self, lb: Option<&LoadBalancer>) -> (Algorithm, Option<u32>) {
        let Some(lb) = lb else {
            return (Algorithm::default(), None);
        };
        match (&lb.simple, &lb.consistent_hash) {
            (Some(simple), None) => {
                let algorithm = match simple.as_str() {
                    "RANDOM" => Algorithm::Random,
                    "ROUND_ROBIN" => Algorithm::RoundRobin,
                    "LEAST_REQUEST" => Algorithm::LeastConn,
                    "WEIGHTED" => Algorithm::Weighted,
                    other => {
                        self.problem(
                            "spec.loadBalancer.simple",
                            format!(
                                "{} is not one of RANDOM, ROUND_ROBIN, LEAST_REQUEST, WEIGHTED",
                                quote(other)
                            ),
                        );
                        Algorithm::default()
                    }
                };
                (algorithm, None)
            }
            (None, Some(hash)) => {
                let size = hash.maglev.table_size.and_then(|n| {
                    let field = "spec.loadBalancer.consistentHash.maglev.tableSize";
                    match u64::try_from(n) {
                        Ok(n) if (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&n) => {
                            if is_prime(n) {
                                u32::try_from(n).ok()
                            } else {
                                self.problem(field, format!("{n} is not a prime"));
                                None
                            }
                        }
                        _ => {
                            self.problem(
                                field,
                                format!("{n} is not in {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"),
                            );
                            None
                        }
                    }
                });
                (Algorithm::Maglev, size)
            }
            _ => {
                self.problem(
                    "spec.loadBalancer",
                    "set exactly one of simple and consistentHash",
                );
                (Algorithm::default(), None)
            }
        }
    }

    fn whole(&mut self, field: &str, value: Option<i64>, max: u32, default: u32) -> u32 {
        match value.map(u32::try_from) {
            None => default,
            Some(Ok(n)) if n <= max => n,
            Some(_) => {
                self.problem(
                    field,
                    format!("{} is not in 0..={max}", value.unwrap_or_default()),
                );
                default
            }
        }
    }

    fn connection_pool(&mut self, pool: Option<&ConnectionPool>) -> u32 {
        self.whole(
            "spec.connectionPool.maxConnections",
            pool.and_then(|p| p.max_connections),
            u32::MAX,
            DEFAULT_MAX_CONNECTIONS,
        )
    }

    fn duration(&mut self, field: &str, value: Option<&String>) -> Option<Duration> {
        let v = value?;
        match parse_duration(v).filter(|_| v.len() <= MAX_DURATION_TEXT) {
            Some(d) if !d.is_zero() => Some(d),
            Some(_) => {
                self.problem(field, format!("{} is not longer than 0s", quote(v)));
                None
            }
            None => {
                self.problem(
                    field,
                    format!(
                        "{} is not a duration like 30s, 1m30s or 500ms (units h, m, s, ms)",
                        quote(v)
                    ),
                );
                None
            }
        }
    }

    fn outlier_detection(
        &mut self,
        od: Option<&OutlierDetection>,
        max_connections: u32,
    ) -> CircuitSettings {
        let default = CircuitSettings {
            max_connections,
            ..CircuitSettings::default()
        };
        let Some(od) = od else {
            return default;
        };
        let at = |f: &str| format!("spec.outlierDetection.{f}");
        let consecutive_failures = self.whole(
            &at("consecutiveFailures"),
            od.consecutive_failures,
            u32::MAX,
            DEFAULT_CONSECUTIVE_FAILURES,
        );
        let base = self.duration(&at("baseEjectionTime"), od.base_ejection_time.as_ref());
        let max = self.duration(&at("maxEjectionTime"), od.max_ejection_time.as_ref());
        let base_ejection = base.unwrap_or(DEFAULT_BASE_EJECTION);
        // Envoy: an unset max_ejection_time is 300 s or base_ejection_time, whichever is larger.
        let max_ejection = max.unwrap_or_else(|| DEFAULT_MAX_EJECTION.max(base_ejection));
        if max.is_some() && max_ejection < base_ejection {
            self.problem(
                at("maxEjectionTime"),
                format!(
                    "{} is shorter than baseEjectionTime ({})",
                    humantime::format_duration(max_ejection),
                    humantime::format_duration(base_ejection)
                ),
            );
        }
        CircuitSettings {
            max_connections,
            consecutive_failures,
            base_ejection,
            max_ejection,
            max_ejection_percent: self.whole(
                &at("maxEjectionPercent"),
                od.max_ejection_percent,
                100,
                DEFAULT_MAX_EJECTION_PERCENT,
            ),
            panic_threshold_percent: self.whole(
                &at("healthyPanicThreshold"),
                od.healthy_panic_threshold,
                100,
                DEFAULT_PANIC_THRESHOLD_PERCENT,
            ),
        }
    }
}

/// A duration as the CRD's schema accepts it: one or more `<digits><unit>`, unit `h`, `m`, `s`
/// or `ms` (the subset of Go's `time.ParseDuration`, which CEL's `duration()` uses, that has no
/// fractions or sub-millisecond units). `None` if it is not one.
#[must_use]
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.as_bytes();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = match rest {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b'h', ..] => (Duration::from_hours(1), 1),
            [b'm', ..] => (Duration::from_mins(1), 1),
            [b's', ..] => (Duration::from_secs(1), 1),
            _ => return None,
        };
        rest = &rest[len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
    }
    Some(total)
}

/// Whether `n` is a prime (trial division; `n` ≤ 131,071 here).
#[must_use]
pub fn is_prime(n: u64) -> bool {
    n >= 2 && (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(spec: &Value) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": { "name": "p", "namespace": "shop" },
            "spec": spec,
        })
    }

    fn err(spec: &Value) -> String {
        parse(&policy(spec)).outcome.unwrap_err().to_string()
    }

    #[test]
    fn a_full_policy_maps_to_the_data_path_settings() {
        let p = parse(&policy(&json!({
            "targetRefs": [
                { "group": "", "kind": "Service", "name": "web" },
                { "kind": "Namespace", "name": "shop" },
            ],
            "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 65537 } } },
            "connectionPool": { "maxConnections": 100 },
            "outlierDetection": {
                "consecutiveFailures": 3,
                "baseEjectionTime": "2s",
                "maxEjectionTime": "1m30s",
                "maxEjectionPercent": 100,
                "healthyPanicThreshold": 0,
            },
        })));
        assert_eq!(
            p.targets,
            vec![
                target(TargetKind::Service, "shop", "web"),
                target(TargetKind::Namespace, "shop", "shop")
            ]
        );
        assert_eq!(
            p.outcome,
            Ok(PolicySettings {
                algorithm: Algorithm::Maglev,
                table_size: Some(65537),
                circuit: CircuitSettings {
                    max_connections: 100,
                    consecutive_failures: 3,
                    base_ejection: Duration::from_secs(2),
                    max_ejection: Duration::from_secs(90),
                    max_ejection_percent: 100,
                    panic_threshold_percent: 0,
                },
            })
        );
    }

    #[test]
    fn absent_fields_are_the_envoy_and_istio_defaults() {
        let p = parse(&policy(
            &json!({ "targetRefs": [{ "kind": "Service", "name": "web" }] }),
        ));
        assert_eq!(p.outcome, Ok(PolicySettings::default()));
        assert_eq!(
            p.outcome.unwrap().circuit,
            CircuitSettings::default(),
            "unlimited connections, panic threshold 50"
        );
        for (simple, algo) in [
            ("RANDOM", Algorithm::Random),
            ("ROUND_ROBIN", Algorithm::RoundRobin),
            ("LEAST_REQUEST", Algorithm::LeastConn),
            ("WEIGHTED", Algorithm::Weighted),
        ] {
            let p = parse(&policy(&json!({
                "targetRefs": [{ "kind": "Service", "name": "web" }],
                "loadBalancer": { "simple": simple },
            })));
            assert_eq!(p.outcome.unwrap().algorithm, algo, "{simple}");
        }
        // Envoy: max_ejection_time unset is 300 s or base_ejection_time, whichever is larger.
        let p = parse(&policy(&json!({
            "targetRefs": [{ "kind": "Service", "name": "web" }],
            "outlierDetection": { "baseEjectionTime": "10m" },
        })));
        assert_eq!(
            p.outcome.unwrap().circuit.max_ejection,
            Duration::from_mins(10)
        );
    }

    #[test]
    fn each_bad_value_names_the_object_field_and_reason() {
        let svc = json!([{ "kind": "Service", "name": "web" }]);
        for (spec, want) in [
            (
                json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionPercent": 150 } }),
                "spec.outlierDetection.maxEjectionPercent: 150 is not in 0..=100",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "healthyPanicThreshold": -1 } }),
                "spec.outlierDetection.healthyPanicThreshold: -1 is not in 0..=100",
            ),
            (
                json!({ "targetRefs": svc, "loadBalancer": { "simple": "FASTEST" } }),
                "spec.loadBalancer.simple: \"FASTEST\" is not one of RANDOM, ROUND_ROBIN, LEAST_REQUEST, WEIGHTED",
            ),
            (
                json!({ "targetRefs": svc, "loadBalancer": {} }),
                "spec.loadBalancer: set exactly one of simple and consistentHash",
            ),
            (
                json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 1024 } } } }),
                "spec.loadBalancer.consistentHash.maglev.tableSize: 1024 is not a prime",
            ),
            (
                json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 131_101 } } } }),
                "spec.loadBalancer.consistentHash.maglev.tableSize: 131101 is not in 1021..=131071",
            ),
            (
                json!({ "targetRefs": svc, "connectionPool": { "maxConnections": 5_000_000_000_i64 } }),
                "spec.connectionPool.maxConnections: 5000000000 is not in 0..=4294967295",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "baseEjectionTime": "30" } }),
                "spec.outlierDetection.baseEjectionTime: \"30\" is not a duration like 30s",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "baseEjectionTime": "0s" } }),
                "spec.outlierDetection.baseEjectionTime: \"0s\" is not longer than 0s",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionTime": "10s" } }),
                "spec.outlierDetection.maxEjectionTime: 10s is shorter than baseEjectionTime (30s)",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionPercent": "ten" } }),
                "spec.outlierDetection.maxEjectionPercent: invalid type: string \"ten\", expected i64",
            ),
            (
                json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionPrecent": 5 } }),
                "spec.outlierDetection.maxEjectionPrecent: unknown field `maxEjectionPrecent`, expected one of",
            ),
            (
                json!({ "targetRefs": [] }),
                "spec.targetRefs: needs at least one target",
            ),
            (
                json!({ "targetRefs": (0..17).map(|i| json!({ "kind": "Service", "name": format!("s{i}") })).collect::<Vec<_>>() }),
                "spec.targetRefs: has 17 targets; at most 16",
            ),
            (
                json!({ "targetRefs": [{ "kind": "Service", "name": "x".repeat(254) }] }),
                "spec.targetRefs[0].name: is longer than 253 characters",
            ),
            (
                json!({ "targetRefs": [{ "kind": "Deployment", "name": "web" }] }),
                "spec.targetRefs[0].kind: \"Deployment\" is not Service or Namespace",
            ),
            (
                json!({ "targetRefs": [{ "group": "apps", "kind": "Service", "name": "web" }] }),
                "spec.targetRefs[0].group: \"apps\" is not \"\"",
            ),
            (
                json!({ "targetRefs": [{ "kind": "Namespace", "name": "other" }] }),
                "spec.targetRefs[0].name: Namespace \"other\" is not the policy's own namespace \"shop\"",
            ),
            (
                json!({ "targetRefs": [{ "kind": "Service", "name": "web" }, { "kind": "Service", "name": "web" }] }),
                "spec.targetRefs[1].name: Service shop/web is already a target",
            ),
        ] {
            let msg = err(&spec);
            assert!(
                msg.starts_with(&format!("TrafficPolicy shop/p: {want}")),
                "{spec}: got {msg}"
            );
            assert!(msg.ends_with("; rejected as a whole"), "{msg}");
        }
    }

    #[test]
    fn every_problem_is_listed_and_nothing_half_applies() {
        let p = parse(&policy(&json!({
            "targetRefs": [{ "kind": "Service", "name": "web" }],
            "loadBalancer": { "simple": "ROUND_ROBIN" },
            "outlierDetection": { "maxEjectionPercent": 101, "consecutiveFailures": -3 },
        })));
        let e = p.outcome.unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert_eq!(p.targets.len(), 1, "targets known even when rejected");
    }

    #[test]
    fn wrong_kind_or_version_and_missing_name_are_rejected() {
        let mut v = policy(&json!({ "targetRefs": [{ "kind": "Service", "name": "web" }] }));
        v["apiVersion"] = json!("traffic.kernmesh.io/v1");
        v["metadata"]["name"] = json!(null);
        let e = parse(&v).outcome.unwrap_err().to_string();
        assert!(e.contains("metadata.name: is required"), "{e}");
        assert!(
            e.contains(
                "apiVersion: \"traffic.kernmesh.io/v1\" is not traffic.kernmesh.io/v1alpha1"
            ),
            "{e}"
        );
        // A status (a copy of a cluster object) is ignored, not an error.
        let mut v = policy(&json!({ "targetRefs": [{ "kind": "Service", "name": "web" }] }));
        v["status"] = json!({ "conditions": [{ "type": "Accepted", "status": "True" }] });
        assert!(parse(&v).outcome.is_ok());
    }

    #[test]
    fn a_policy_that_does_not_deserialize_still_names_its_targets() {
        let p = parse(&policy(&json!({
            "targetRefs": [{ "kind": "Service", "name": "web" }],
            "connectionPool": "lots",
        })));
        assert!(p.outcome.is_err());
        assert_eq!(p.targets, vec![target(TargetKind::Service, "shop", "web")]);
    }

    #[test]
    fn durations_follow_the_schema_pattern() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_hours(2)));
        for bad in [
            "",
            "30",
            "1.5s",
            "1m 30s",
            "s",
            "10us",
            "-1s",
            "99999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(1021) && is_prime(65537) && is_prime(131_071));
        assert!(!is_prime(1023) && !is_prime(131_070) && !is_prime(1));
    }
}
