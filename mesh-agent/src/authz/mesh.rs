//! Enrollment and peer authentication: which pods are in the mesh, their SPIFFE ids, their
//! effective mTLS mode, and the authorization policies selecting each — the per-workload view
//! the proxies, the kernel's same-node verdicts and `meshctl policies` read.
//!
//! Enrollment, as Istio ambient's `istio.io/dataplane-mode`: a namespace labelled
//! `kernmesh.io/dataplane-mode=mesh` enrolls its pods; a pod labelled `mesh` is enrolled in any
//! namespace (Istio ≥ 1.22 does the same for `ambient`); a pod labelled `none` is never; a
//! host-network pod never is (its traffic is the node's; Istio likewise skips it). A Service
//! labelled `none` is opted out: traffic to it stays plaintext L4 whatever its pods.
//!
//! Peer authentication, Istio's precedence: the oldest valid workload policy (selector matching
//! the pod, in the pod's namespace) with a mode, else the oldest valid namespace-wide one of the
//! pod's namespace with a mode, else the oldest mesh-wide one (root namespace, no selector) with
//! a mode, else `PERMISSIVE`. `UNSET` inherits from the level above.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use super::{
    engine::{
        AuthzIndex, Decision, DecisionReason, Denial, EnforcementPoint, KernelKey, Peer,
        UNAUTHENTICATED, WorkloadPolicies, evaluate_peer, kernel_entries, selects,
    },
    parse::{MtlsMode, ParsedAuthz, ParsedPeerAuthn},
};
use crate::{
    identity::SpiffeId,
    model::{ClusterModel, ObjectName},
};

/// The enrollment label, on namespaces, pods and services.
pub const DATAPLANE_MODE_LABEL: &str = "kernmesh.io/dataplane-mode";
/// Label value that enrolls.
pub const MODE_MESH: &str = "mesh";
/// Label value that opts out.
pub const MODE_NONE: &str = "none";
/// Trust domain when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Root namespace when none is configured: the agent's namespace in `deploy/` (Istio's
/// `istio-system` role). Namespace-wide policies here apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "mesh-system";

/// A `kernmesh.io/dataplane-mode` label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataplaneMode {
    Mesh,
    None,
}

impl DataplaneMode {
    /// The mode a label set asks for; `None` for no label or a value other than `mesh`/`none`
    /// (Istio ignores values it does not know the same way).
    #[must_use]
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some(MODE_MESH) => Some(Self::Mesh),
            Some(MODE_NONE) => Some(Self::None),
            _ => None,
        }
    }
}

/// What the sources read for the mesh, kept in the model ([`ClusterModel::mesh`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshInputs {
    /// Namespace → its `kernmesh.io/dataplane-mode` (namespaces without one are absent).
    pub namespace_modes: BTreeMap<String, DataplaneMode>,
    /// Pod → its labels (for opt-out and policy selectors).
    pub pod_labels: BTreeMap<ObjectName, BTreeMap<String, String>>,
    /// Services labelled `kernmesh.io/dataplane-mode=none`.
    pub opted_out_services: BTreeSet<ObjectName>,
    /// Every `AuthorizationPolicy`, valid or not.
    pub authorization: Vec<ParsedAuthz>,
    /// Every `PeerAuthentication`, valid or not.
    pub peer_authentication: Vec<ParsedPeerAuthn>,
    /// Trust domain and root namespace: set by the agent from its config when a model arrives
    /// (sources leave the default), so the snapshot builds [`MeshView`] with them.
    pub settings: MeshSettings,
}

impl MeshInputs {
    /// Whether an endpoint in `namespace` is in the mesh as far as this node can tell: its
    /// namespace is labelled `mesh` and, if the pod is one this node knows (`pod_labels`), the
    /// pod is not labelled `none`. Remote pods' own labels are not watched (only this node's
    /// pods are), so a remote pod enrolled by its own label alone, or opted out by it, is
    /// judged by its namespace here (ztunnel learns every workload from istiod instead).
    #[must_use]
    pub fn endpoint_enrolled(&self, namespace: &str, pod: Option<&ObjectName>) -> bool {
        let labels = pod.and_then(|p| self.pod_labels.get(p));
        match labels.and_then(DataplaneMode::from_labels) {
            Some(mode) => mode == DataplaneMode::Mesh,
            None => self.namespace_modes.get(namespace) == Some(&DataplaneMode::Mesh),
        }
    }
}

/// The settings the view needs (config `mesh.trustDomain` and `mesh.rootNamespace`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    pub trust_domain: String,
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
        }
    }
}

/// Where a pod's mTLS mode comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModeSource {
    /// No policy sets one: Istio's default, `PERMISSIVE`.
    Default,
    Workload(ObjectName),
    Namespace(ObjectName),
    Mesh(ObjectName),
}

/// One enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodMesh {
    pub identity: SpiffeId,
    pub mode: MtlsMode,
    pub mode_from: ModeSource,
    /// The authorization policies selecting it.
    pub policies: WorkloadPolicies,
}

/// Why a pod of the model is not enrolled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NotEnrolled {
    /// Neither its namespace nor the pod asks for the mesh.
    NotLabelled,
    /// Labelled `kernmesh.io/dataplane-mode=none`.
    OptedOut,
    HostNetwork,
    /// Its namespace or service account cannot form a SPIFFE id.
    BadIdentity(String),
}

/// How one security object stands (for status and `meshctl policies`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectState {
    pub accepted: bool,
    /// The rejection, for an invalid object.
    pub message: String,
    /// Pods of the model it selects (valid objects only).
    pub selects: usize,
}

/// The mesh as this node sees it: every pod's enrollment, identity, mode and policies.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    pub settings: MeshSettings,
    pub enrolled: BTreeMap<ObjectName, PodMesh>,
    /// Pods left out for a reason other than [`NotEnrolled::NotLabelled`]: a pod of the model
    /// in neither map is not labelled (most of a large cluster's pods, which this view does
    /// not hold an entry for; see [`MeshView::not_enrolled`]).
    pub not_enrolled_by: BTreeMap<ObjectName, NotEnrolled>,
    /// Enrolled pod by address.
    pub by_ip: HashMap<IpAddr, ObjectName>,
    pub authz: AuthzIndex,
    /// Every security object by (kind, name).
    pub objects: BTreeMap<(&'static str, ObjectName), ObjectState>,
}

impl MeshView {
    /// Why a pod of `model` is not enrolled; `None` for an enrolled pod or one not in the model.
    #[must_use]
    pub fn not_enrolled(&self, model: &ClusterModel, name: &ObjectName) -> Option<NotEnrolled> {
        if self.enrolled.contains_key(name) || !model.has_pod(name) {
            return None;
        }
        Some(
            self.not_enrolled_by
                .get(name)
                .cloned()
                .unwrap_or(NotEnrolled::NotLabelled),
        )
    }

    /// Computes the view of `model` (pure; run once per model).
    #[must_use]
    pub fn build(model: &ClusterModel, settings: &MeshSettings) -> Self {
        let inputs = &model.mesh;
        let authz = AuthzIndex::new(&inputs.authorization, &settings.root_namespace);
        let mut view = Self {
            settings: settings.clone(),
            authz,
            ..Self::default()
        };
        let no_labels = BTreeMap::new();
        for (name, pod) in &model.pods {
            let labels = inputs.pod_labels.get(name).unwrap_or(&no_labels);
            let ns_mode = inputs.namespace_modes.get(&name.namespace).copied();
            let why = if pod.host_network {
                Some(NotEnrolled::HostNetwork)
            } else {
                match (DataplaneMode::from_labels(labels), ns_mode) {
                    (Some(DataplaneMode::None), _) => Some(NotEnrolled::OptedOut),
                    (Some(DataplaneMode::Mesh), _) | (None, Some(DataplaneMode::Mesh)) => None,
                    (None, _) => Some(NotEnrolled::NotLabelled),
                }
            };
            match why {
                None => {}
                Some(NotEnrolled::NotLabelled) => continue,
                Some(why) => {
                    view.not_enrolled_by.insert(name.clone(), why);
                    continue;
                }
            }
            let identity = match SpiffeId::new(
                &settings.trust_domain,
                &name.namespace,
                &pod.service_account,
            ) {
                Ok(id) => id,
                Err(e) => {
                    view.not_enrolled_by
                        .insert(name.clone(), NotEnrolled::BadIdentity(e.to_string()));
                    continue;
                }
            };
            let (mode, mode_from) = peer_mode(
                &inputs.peer_authentication,
                &settings.root_namespace,
                &name.namespace,
                labels,
            );
            let policies = view.authz.for_workload(&name.namespace, labels);
            for ip in &pod.ips {
                view.by_ip.entry(*ip).or_insert_with(|| name.clone());
            }
            view.enrolled.insert(
                name.clone(),
                PodMesh {
                    identity,
                    mode,
                    mode_from,
                    policies,
                },
            );
        }
        view.objects = object_states(inputs, &view, settings);
        view
    }

    /// The authorization hook of the inbound proxy: the verdict for a connection from `source`
    /// (the peer certificate's id; `None` = plaintext) to `destination` (a pod address of this
    /// node) on the pod's `port`. An address that is no enrolled pod is denied.
    #[must_use]
    pub fn authorize(&self, source: Option<&SpiffeId>, destination: IpAddr, port: u16) -> Decision {
        match self
            .by_ip
            .get(&destination)
            .and_then(|n| self.enrolled.get(n))
        {
            Some(pod) => evaluate_peer(&pod.policies, &Peer::new(source), port),
            None => Decision {
                allowed: false,
                policy: None,
                reason: DecisionReason::UnknownDestination,
            },
        }
    }

    /// The enrolled pod at `ip` (this node's pods, in Kubernetes) and its mesh view.
    #[must_use]
    pub fn pod_at(&self, ip: IpAddr) -> Option<(&ObjectName, &PodMesh)> {
        let name = self.by_ip.get(&ip)?;
        Some((name, self.enrolled.get(name)?))
    }

    /// The inbound HBONE proxy's hook, in the shape its `Authorizer` takes (verified client
    /// identity, the destination identity the client asked for, the destination pod address):
    /// denied unless `dst` is an enrolled pod whose identity is `dst_id` and the pod's policies
    /// allow `source` on `dst`'s port. A denial is logged ([`Denial`], both identities).
    #[must_use]
    pub fn authorize_inbound(
        &self,
        source: &SpiffeId,
        dst_id: &SpiffeId,
        dst: SocketAddr,
    ) -> Decision {
        let found = self.pod_at(dst.ip()).filter(|(_, p)| &p.identity == dst_id);
        let decision = match found {
            Some((_, pod)) => evaluate_peer(&pod.policies, &Peer::new(Some(source)), dst.port()),
            None => Decision {
                allowed: false,
                policy: None,
                reason: DecisionReason::UnknownDestination,
            },
        };
        if !decision.allowed {
            Denial {
                source: Some(source),
                source_addr: None,
                destination: Some(dst_id),
                destination_pod: found.map(|(n, _)| n),
                destination_addr: dst,
                point: EnforcementPoint::Hbone,
                decision: &decision,
            }
            .log();
        }
        decision
    }

    /// The same-node kernel verdicts for this view: every enrolled pod of `model.node` as a
    /// destination (`destination_number`), every distinct enrolled identity of the model as a
    /// source (`source_number`) plus [`UNAUTHENTICATED`]. Pods sharing a destination number
    /// (numbered by SPIFFE id, while policies select by label) get the conjunction of their
    /// verdicts: deny wins. See [`kernel_entries`] for the lookup.
    #[must_use]
    pub fn kernel_entries(
        &self,
        model: &ClusterModel,
        source_number: &dyn Fn(&SpiffeId) -> u32,
        destination_number: &dyn Fn(&ObjectName) -> u32,
    ) -> BTreeMap<KernelKey, bool> {
        let destinations: Vec<(u32, &WorkloadPolicies)> = self
            .enrolled
            .iter()
            .filter(|(name, _)| model.pods.get(*name).is_some_and(|p| p.node == model.node))
            .map(|(name, pod)| (destination_number(name), &pod.policies))
            .collect();
        let identities: BTreeSet<&SpiffeId> = self.enrolled.values().map(|p| &p.identity).collect();
        let mut sources: Vec<(u32, Option<&SpiffeId>)> = vec![(UNAUTHENTICATED, None)];
        sources.extend(
            identities
                .into_iter()
                .map(|id| (source_number(id), Some(id))),
        );
        kernel_entries(&destinations, &sources)
    }

    /// Whether traffic to a service stays out of the mesh (labelled `none`).
    #[must_use]
    pub fn service_opted_out(model: &ClusterModel, service: &ObjectName) -> bool {
        model.mesh.opted_out_services.contains(service)
    }
}

/// The effective mode of a pod in `namespace` with `labels`, and where it comes from.
#[must_use]
pub fn peer_mode(
    all: &[ParsedPeerAuthn],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (MtlsMode, ModeSource) {
    let mut valid: Vec<_> = all
        .iter()
        .filter_map(|p| p.outcome.as_ref().ok().map(|s| (p, s)))
        .collect();
    valid.sort_by(|a, b| a.0.age_key().cmp(&b.0.age_key()));
    let pick = |want_selector: bool, ns: &str| {
        valid.iter().find_map(|(p, s)| {
            let level = s.selector.is_some() == want_selector && p.name.namespace == ns;
            let applies = level && selects(s.selector.as_ref(), labels);
            applies
                .then_some(s.mode)
                .flatten()
                .map(|m| (m, p.name.clone()))
        })
    };
    if let Some((m, n)) = pick(true, namespace) {
        return (m, ModeSource::Workload(n));
    }
    if let Some((m, n)) = pick(false, namespace) {
        let from = if namespace == root_namespace {
            ModeSource::Mesh(n)
        } else {
            ModeSource::Namespace(n)
        };
        return (m, from);
    }
    if let Some((m, n)) = pick(false, root_namespace) {
        return (m, ModeSource::Mesh(n));
    }
    (MtlsMode::Permissive, ModeSource::Default)
}

/// Why an object is not accepted: its rejection, or its newer version's (the last valid one
/// still applies).
fn state_message<T>(p: &super::parse::Parsed<T>) -> String {
    match (&p.outcome, &p.superseded_by) {
        (Err(e), _) => e.to_string(),
        (Ok(_), Some(e)) => format!("{e}; the last valid version still applies"),
        (Ok(_), None) => String::new(),
    }
}

fn object_states(
    inputs: &MeshInputs,
    view: &MeshView,
    settings: &MeshSettings,
) -> BTreeMap<(&'static str, ObjectName), ObjectState> {
    let mut out = BTreeMap::new();
    for p in &inputs.authorization {
        let selects = view
            .enrolled
            .values()
            .filter(|w| w.policies.iter().any(|q| q.name == p.name))
            .count();
        out.insert(
            (super::types::AUTHZ_KIND, p.name.clone()),
            ObjectState {
                accepted: p.outcome.is_ok() && p.superseded_by.is_none(),
                message: state_message(p),
                selects,
            },
        );
    }
    for p in &inputs.peer_authentication {
        let selects = match &p.outcome {
            Ok(s) => view
                .enrolled
                .iter()
                .filter(|(n, _)| {
                    let labels = inputs.pod_labels.get(n).cloned().unwrap_or_default();
                    let in_scope = p.name.namespace == n.namespace
                        || (p.name.namespace == settings.root_namespace && s.selector.is_none());
                    in_scope && selects(s.selector.as_ref(), &labels)
                })
                .count(),
            Err(_) => 0,
        };
        out.insert(
            (super::types::PEER_AUTHN_KIND, p.name.clone()),
            ObjectState {
                accepted: p.outcome.is_ok() && p.superseded_by.is_none(),
                message: state_message(p),
                selects,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{authz::parse::parse_peer_authentication, model::Pod};

    fn pod(ns: &str, name: &str, ip: u8) -> Pod {
        Pod {
            name: ObjectName::new(ns, name),
            node: "a".into(),
            service_account: "sa".into(),
            ips: vec![IpAddr::from([10, 1, 0, ip])],
            uid: String::new(),
            host_network: false,
        }
    }

    fn peer(ns: &str, name: &str, created: &str, spec: &serde_json::Value) -> ParsedPeerAuthn {
        let p = parse_peer_authentication(&json!({
            "apiVersion": "security.kernmesh.io/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": { "name": name, "namespace": ns, "creationTimestamp": created },
            "spec": spec,
        }));
        assert!(p.outcome.is_ok(), "{:?}", p.outcome);
        p
    }

    fn model() -> ClusterModel {
        let mut m = ClusterModel::default();
        for (i, (ns, name)) in [
            ("shop", "web"),
            ("shop", "db"),
            ("shop", "legacy"),
            ("other", "x"),
            ("other", "joined"),
        ]
        .into_iter()
        .enumerate()
        {
            let p = pod(ns, name, u8::try_from(i).unwrap() + 1);
            m.mesh.pod_labels.insert(
                p.name.clone(),
                BTreeMap::from([("app".to_owned(), name.to_owned())]),
            );
            m.pods.insert(p.name.clone(), std::sync::Arc::new(p));
        }
        m.mesh
            .namespace_modes
            .insert("shop".into(), DataplaneMode::Mesh);
        let labels = |n: &str| {
            m.mesh.pod_labels[&ObjectName::new(if n == "legacy" { "shop" } else { "other" }, n)]
                .clone()
        };
        let mut legacy = labels("legacy");
        legacy.insert(DATAPLANE_MODE_LABEL.into(), MODE_NONE.into());
        let mut joined = labels("joined");
        joined.insert(DATAPLANE_MODE_LABEL.into(), MODE_MESH.into());
        m.mesh
            .pod_labels
            .insert(ObjectName::new("shop", "legacy"), legacy);
        m.mesh
            .pod_labels
            .insert(ObjectName::new("other", "joined"), joined);
        m
    }

    #[test]
    fn namespace_and_pod_labels_decide_enrollment_and_identity() {
        let v = MeshView::build(&model(), &MeshSettings::default());
        let enrolled: Vec<String> = v.enrolled.keys().map(ToString::to_string).collect();
        assert_eq!(enrolled, ["other/joined", "shop/db", "shop/web"]);
        let m = model();
        assert_eq!(
            v.not_enrolled(&m, &ObjectName::new("shop", "legacy")),
            Some(NotEnrolled::OptedOut)
        );
        assert_eq!(
            v.not_enrolled(&m, &ObjectName::new("other", "x")),
            Some(NotEnrolled::NotLabelled)
        );
        assert_eq!(v.not_enrolled(&m, &ObjectName::new("shop", "web")), None);
        assert_eq!(v.not_enrolled(&m, &ObjectName::new("shop", "gone")), None);
        assert_eq!(
            v.enrolled[&ObjectName::new("shop", "web")]
                .identity
                .to_string(),
            "spiffe://cluster.local/ns/shop/sa/sa"
        );
        let td = MeshSettings {
            trust_domain: "example.org".into(),
            ..MeshSettings::default()
        };
        let v = MeshView::build(&model(), &td);
        assert_eq!(
            v.enrolled[&ObjectName::new("shop", "web")]
                .identity
                .trust_domain(),
            "example.org"
        );
    }

    #[test]
    fn peer_authentication_precedence_is_workload_namespace_mesh() {
        let mut m = model();
        let v = MeshView::build(&m, &MeshSettings::default());
        assert_eq!(
            (
                v.enrolled[&ObjectName::new("shop", "web")].mode,
                &v.enrolled[&ObjectName::new("shop", "web")].mode_from
            ),
            (MtlsMode::Permissive, &ModeSource::Default)
        );
        m.mesh.peer_authentication = vec![
            peer(
                DEFAULT_ROOT_NAMESPACE,
                "default",
                "2026-01-01T00:00:00Z",
                &json!({ "mtls": { "mode": "STRICT" } }),
            ),
            peer(
                "shop",
                "ns",
                "2026-01-02T00:00:00Z",
                &json!({ "mtls": { "mode": "PERMISSIVE" } }),
            ),
            peer(
                "shop",
                "db",
                "2026-01-03T00:00:00Z",
                &json!({ "selector": { "matchLabels": { "app": "db" } }, "mtls": { "mode": "STRICT" } }),
            ),
            // UNSET at the workload inherits from the namespace.
            peer(
                "shop",
                "web-unset",
                "2026-01-01T00:00:00Z",
                &json!({ "selector": { "matchLabels": { "app": "web" } } }),
            ),
            // A younger namespace-wide policy loses to the older one.
            peer(
                "shop",
                "ns-younger",
                "2026-02-01T00:00:00Z",
                &json!({ "mtls": { "mode": "STRICT" } }),
            ),
        ];
        let v = MeshView::build(&m, &MeshSettings::default());
        let mode = |ns: &str, n: &str| {
            let p = &v.enrolled[&ObjectName::new(ns, n)];
            (p.mode, p.mode_from.clone())
        };
        assert_eq!(
            mode("shop", "db"),
            (
                MtlsMode::Strict,
                ModeSource::Workload(ObjectName::new("shop", "db"))
            )
        );
        assert_eq!(
            mode("shop", "web"),
            (
                MtlsMode::Permissive,
                ModeSource::Namespace(ObjectName::new("shop", "ns"))
            )
        );
        assert_eq!(
            mode("other", "joined"),
            (
                MtlsMode::Strict,
                ModeSource::Mesh(ObjectName::new(DEFAULT_ROOT_NAMESPACE, "default"))
            )
        );
        assert_eq!(
            v.objects[&("PeerAuthentication", ObjectName::new("shop", "db"))].selects,
            1
        );
    }

    #[test]
    fn the_inbound_hook_evaluates_the_destination_pods_policies() {
        let mut m = model();
        m.mesh.authorization = vec![crate::authz::parse_authorization(&json!({
            "apiVersion": "security.kernmesh.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": "deny-other", "namespace": "shop" },
            "spec": { "action": "DENY", "rules": [{ "from": [{ "source": { "namespaces": ["other"] } }] }] },
        }))];
        let v = MeshView::build(&m, &MeshSettings::default());
        let joined = SpiffeId::new("cluster.local", "other", "sa").unwrap();
        let web = IpAddr::from([10, 1, 0, 1]);
        assert!(!v.authorize(Some(&joined), web, 80).allowed);
        assert!(v.authorize(None, web, 80).allowed);
        let web_id = v.enrolled[&ObjectName::new("shop", "web")].identity.clone();
        let web_addr = SocketAddr::new(web, 80);
        assert!(!v.authorize_inbound(&joined, &web_id, web_addr).allowed);
        let shop = SpiffeId::new("cluster.local", "shop", "x").unwrap();
        assert!(v.authorize_inbound(&shop, &web_id, web_addr).allowed);
        let d = v.authorize_inbound(&shop, &joined, web_addr);
        assert_eq!(
            d.reason,
            DecisionReason::UnknownDestination,
            "the identity asked for is not the pod's"
        );
        let d = v.authorize(None, IpAddr::from([10, 1, 0, 3]), 80);
        assert_eq!(
            d.reason,
            DecisionReason::UnknownDestination,
            "opted-out pod"
        );
        assert_eq!(
            v.objects[&("AuthorizationPolicy", ObjectName::new("shop", "deny-other"))].selects,
            2
        );
        // The kernel's same-node verdicts: pods numbered by their last address octet + 100,
        // identities by namespace (shop = 1, other = 2).
        m.node = "a".into();
        let number = |id: &SpiffeId| if id.namespace() == "shop" { 1 } else { 2 };
        let pod_number = |n: &ObjectName| match m.pods[n].ips[0] {
            IpAddr::V4(v4) => u32::from(v4.octets()[3]) + 100,
            IpAddr::V6(_) => 0,
        };
        let entries = v.kernel_entries(&m, &number, &pod_number);
        assert!(
            !crate::authz::kernel_lookup(&entries, 2, 101, 80),
            "other → web denied"
        );
        assert!(
            crate::authz::kernel_lookup(&entries, 1, 101, 80),
            "shop → web allowed"
        );
        assert!(crate::authz::kernel_lookup(
            &entries,
            UNAUTHENTICATED,
            101,
            80
        ));
        assert!(entries.keys().any(|k| k.1 == 101));
        assert!(
            entries.keys().all(|k| k.1 != 103),
            "opted-out pod: no entries"
        );
    }
}
