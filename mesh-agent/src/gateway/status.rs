//! Route and Gateway status: the facts the configuration compiler finds about every route and
//! listener (`Accepted`, `ResolvedRefs` with the Gateway API's reasons), completed with which
//! backend Services exist, published as JSON on the admin endpoint (`/routes`, read by
//! `meshctl routes`) and, from Kubernetes, written to the objects' `status` by the one instance
//! that holds the status Lease.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::config::GatewayConfig;
use crate::model::{ClusterModel, ObjectName};

/// Default `GatewayClass.spec.controllerName` served (Envoy Gateway's is
/// `gateway.envoyproxy.io/gatewayclass-controller`, Istio's `istio.io/gateway-controller`).
pub const DEFAULT_CONTROLLER_NAME: &str = "kernmesh.io/gateway-controller";

/// Condition types and reasons of the Gateway API (`gateway.networking.k8s.io/v1`).
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const PROGRAMMED: &str = "Programmed";
    pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
    pub const NOT_ALLOWED_BY_LISTENERS: &str = "NotAllowedByListeners";
    pub const NO_MATCHING_LISTENER_HOSTNAME: &str = "NoMatchingListenerHostname";
    /// A route with a value the implementation does not support or that is invalid (GEP-1364).
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
    pub const INVALID_KIND: &str = "InvalidKind";
    pub const INVALID: &str = "Invalid";
    pub const INVALID_CERTIFICATE_REF: &str = "InvalidCertificateRef";
    pub const UNSUPPORTED_PROTOCOL: &str = "UnsupportedProtocol";
    pub const PORT_UNAVAILABLE: &str = "PortUnavailable";
}

/// One condition: `status` True/False, a reason of the spec and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cond {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    #[must_use]
    pub fn yes(reason: &str) -> Self {
        Self {
            status: true,
            reason: reason.to_owned(),
            message: String::new(),
        }
    }

    #[must_use]
    pub fn no(reason: &str, message: impl Into<String>) -> Self {
        Self {
            status: false,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// A route's standing with one of its parents (a Gateway this gateway serves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentInfo {
    /// `namespace/name` of the Gateway.
    #[serde(with = "object_name")]
    pub gateway: ObjectName,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub section: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<i32>,
    pub accepted: Cond,
}

/// One `backendRef` as compiled: the Service port, or why it cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `namespace/name:port` (or the name as written when unresolved).
    pub target: String,
    pub weight: u32,
    /// `None`: resolved (so far: whether the Service exists is judged against the model).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub problem: Option<Cond>,
    /// Resolved Service and port (for the existence check).
    #[serde(skip)]
    pub service: Option<(ObjectName, u16)>,
}

/// One rule: what it matches and where it sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub matches: Vec<String>,
    pub backends: Vec<BackendInfo>,
    /// Redirect, rewrite, header or mirror filters (by type).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub filters: Vec<String>,
}

/// Everything `meshctl routes` and the status writer need about one route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    #[serde(with = "object_name")]
    pub name: ObjectName,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub generation: Option<i64>,
    pub hostnames: Vec<String>,
    pub parents: Vec<ParentInfo>,
    pub resolved_refs: Cond,
    pub rules: Vec<RuleInfo>,
}

/// One listener's standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    pub attached_routes: u32,
    pub accepted: Cond,
    pub resolved_refs: Cond,
}

/// One Gateway's standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    #[serde(with = "object_name")]
    pub name: ObjectName,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub generation: Option<i64>,
    pub accepted: Cond,
    pub listeners: Vec<ListenerInfo>,
}

/// What `/routes` serves: every Gateway and route this gateway judged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesReport {
    /// `file` or `kubernetes`.
    pub source: String,
    pub gateways: Vec<GatewayInfo>,
    pub routes: Vec<RouteInfo>,
    /// Objects left out of the configuration, with why (Kubernetes source only; a file is
    /// rejected whole instead).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub rejected: Vec<String>,
}

/// The Service ports that exist in the model (a `backendRef` to anything else is
/// `BackendNotFound`; a Service without ready endpoints still exists and answers 503).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownServices(pub BTreeSet<(ObjectName, u16)>);

impl KnownServices {
    #[must_use]
    pub fn of(model: &ClusterModel) -> Self {
        Self(
            model
                .services
                .values()
                .flat_map(|s| s.ports.iter().map(|p| (s.name.clone(), p.port)))
                .collect(),
        )
    }
}

impl RoutesReport {
    /// The report of `cfg`, with `BackendNotFound` for Service ports missing from `known`
    /// (`None`: no model yet, so existence is not judged).
    #[must_use]
    pub fn build(cfg: &GatewayConfig, source: &str, known: Option<&KnownServices>) -> Self {
        let mut routes = cfg.route_infos.clone();
        if let Some(known) = known {
            for r in &mut routes {
                for b in r.rules.iter_mut().flat_map(|rule| &mut rule.backends) {
                    if let (None, Some(s)) = (&b.problem, &b.service)
                        && !known.0.contains(s)
                    {
                        b.problem = Some(Cond::no(
                            reason::BACKEND_NOT_FOUND,
                            format!("Service {} has no port {}", s.0, s.1),
                        ));
                    }
                }
            }
        }
        for r in &mut routes {
            r.resolved_refs = resolved(&r.rules);
        }
        // Attached routes per listener: routes whose parent ref accepted it through that
        // listener (by section name, or every listener of the Gateway).
        let mut attached: BTreeMap<(ObjectName, String), u32> = BTreeMap::new();
        for r in &routes {
            for p in r.parents.iter().filter(|p| p.accepted.status) {
                for g in cfg.gateway_infos.iter().filter(|g| g.name == p.gateway) {
                    for l in &g.listeners {
                        if p.section.as_deref().is_none_or(|s| s == l.name)
                            && p.port.is_none_or(|port| port == l.port)
                        {
                            *attached
                                .entry((g.name.clone(), l.name.clone()))
                                .or_default() += 1;
                        }
                    }
                }
            }
        }
        let mut gateways = cfg.gateway_infos.clone();
        for g in &mut gateways {
            for l in &mut g.listeners {
                l.attached_routes = attached
                    .get(&(g.name.clone(), l.name.clone()))
                    .copied()
                    .unwrap_or(0);
            }
        }
        Self {
            source: source.to_owned(),
            gateways,
            routes,
            rejected: cfg.rejected.clone(),
        }
    }
}

/// `ResolvedRefs` of a route: the first unresolved reference's reason (the spec lets a route
/// with some bad references still serve the others; requests choosing a bad one get 500).
fn resolved(rules: &[RuleInfo]) -> Cond {
    let problems: Vec<&Cond> = rules
        .iter()
        .flat_map(|r| &r.backends)
        .filter_map(|b| b.problem.as_ref())
        .collect();
    match problems.first() {
        None => Cond::yes(reason::RESOLVED_REFS),
        Some(first) => Cond::no(
            &first.reason,
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// The newest report as JSON, served on `/routes` (one per process: one gateway per process).
static PUBLISHED: std::sync::OnceLock<arc_swap::ArcSwap<String>> = std::sync::OnceLock::new();

/// Publishes `report` for `/routes`.
pub fn publish(report: &RoutesReport) {
    let json = Arc::new(serde_json::to_string(report).unwrap_or_else(|_| "{}".into()));
    PUBLISHED
        .get_or_init(|| arc_swap::ArcSwap::from_pointee(String::new()))
        .store(json);
}

/// The last published report (`None` before the first).
#[must_use]
pub fn published() -> Option<Arc<String>> {
    PUBLISHED
        .get()
        .map(arc_swap::ArcSwap::load_full)
        .filter(|s| !s.is_empty())
}

/// `ObjectName` as the `namespace/name` string people and `kubectl` use.
mod object_name {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::model::ObjectName;

    pub fn serialize<S: Serializer>(n: &ObjectName, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectName, D::Error> {
        let s = String::deserialize(d)?;
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not namespace/name")))?;
        Ok(ObjectName::new(ns, name))
    }
}

/// Keeps the report current: rebuilds it when the configuration or the known Services change,
/// publishes it for `/routes` and hands it to the status writer (if any). Returns when the
/// configuration sender is gone.
pub async fn report_loop(
    source: &'static str,
    mut configs: tokio::sync::watch::Receiver<Arc<GatewayConfig>>,
    mut known: tokio::sync::watch::Receiver<Option<Arc<KnownServices>>>,
    out: tokio::sync::watch::Sender<Arc<RoutesReport>>,
) {
    loop {
        let cfg = Arc::clone(&configs.borrow_and_update());
        let k = known.borrow_and_update().clone();
        let report = RoutesReport::build(&cfg, source, k.as_deref());
        publish(&report);
        out.send_if_modified(|old| {
            if **old == report {
                false
            } else {
                *old = Arc::new(report);
                true
            }
        });
        tokio::select! {
            r = configs.changed() => if r.is_err() { return },
            r = known.changed() => if r.is_err() { return },
        }
    }
}
