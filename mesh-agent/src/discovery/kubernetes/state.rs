//! Everything watched ([`State`]) and the complete model built from it, with the policies and
//! security objects resolved onto it.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A rejected policy to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The `TrafficPolicy`.
    pub policy: ObjectName,
    /// Every problem of it.
    pub error: PolicyError,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl From<Rejection> for discovery::Rejection {
    fn from(r: Rejection) -> Self {
        let problems: Vec<String> = r.error.problems.iter().map(ToString::to_string).collect();
        Self::InvalidField {
            object: ObjectRef::new("TrafficPolicy", r.policy),
            field: "spec".to_owned(),
            message: format!("{}; rejected as a whole", problems.join("; ")),
        }
    }
}

/// Everything watched, plus what is remembered between models.
pub(super) struct State {
    pub(super) node: String,
    pub(super) services: Store<StoredService>,
    pub(super) slices: Store<StoredSlice>,
    /// Node and zone names the slices share.
    pub(super) names: Names,
    pub(super) pods: PodStore,
    pub(super) namespaces: Store<K8sNamespace>,
    /// This node only (its zone).
    pub(super) nodes: Store<K8sNode>,
    pub(super) policies: Store<DynamicObject>,
    /// Whether the `TrafficPolicy` CRD was found missing (logged once per absence).
    pub(super) policy_crd_missing: bool,
    /// Rejections already reported per policy (each is reported once while it persists).
    pub(super) reported: BTreeMap<ObjectName, String>,
    /// What each policy's status should say, for the elected writer.
    pub(super) desired_status: DesiredStatus,
    /// `AuthorizationPolicy` and `PeerAuthentication` objects, whole (few; the parser names
    /// every field of a malformed one).
    pub(super) authz_policies: Store<DynamicObject>,
    pub(super) peer_authns: Store<DynamicObject>,
    /// Which security CRDs were found missing (logged once per absence).
    pub(super) security_crd_missing: BTreeSet<&'static str>,
    /// Security-object rejections already reported (kind, object) → message.
    pub(super) security_reported: BTreeMap<(&'static str, ObjectName), String>,
    /// The last valid version of each security object: an update that is invalid leaves it
    /// applying (Envoy's NACK keeps the last good config) — dropping a DENY because its edit
    /// has a typo would open what it closed. An object never valid applies nowhere.
    pub(super) last_good_authz: BTreeMap<ObjectName, crate::authz::ParsedAuthz>,
    pub(super) last_good_peer: BTreeMap<ObjectName, crate::authz::ParsedPeerAuthn>,
    /// What each security object's status should say (`Accepted` or `Invalid`), per kind.
    pub(super) authz_status: DesiredStatus,
    pub(super) peer_status: DesiredStatus,
}

impl State {
    pub(super) fn new(node: String) -> Self {
        Self {
            node,
            services: Store::new(),
            slices: Store::new(),
            names: Names::default(),
            pods: PodStore::new(),
            namespaces: Store::new(),
            nodes: Store::new(),
            policies: Store::new(),
            policy_crd_missing: false,
            reported: BTreeMap::new(),
            desired_status: DesiredStatus::new(),
            authz_policies: Store::new(),
            peer_authns: Store::new(),
            security_crd_missing: BTreeSet::new(),
            security_reported: BTreeMap::new(),
            last_good_authz: BTreeMap::new(),
            last_good_peer: BTreeMap::new(),
            authz_status: DesiredStatus::new(),
            peer_status: DesiredStatus::new(),
        }
    }

    pub(super) fn ready(&self) -> bool {
        self.services.ready
            && self.slices.ready
            && self.pods.store.ready
            && self.namespaces.ready
            && self.nodes.ready
            && self.policies.ready
            && self.authz_policies.ready
            && self.peer_authns.ready
    }

    /// This node's zone label, if its Node object has one.
    pub(super) fn zone(&self) -> Option<String> {
        self.nodes
            .objects
            .get(&ObjectName::new("", self.node.clone()))
            .and_then(|n| n.labels().get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned()
    }

    pub(super) fn namespace_live(&self, ns: &str) -> bool {
        self.namespaces
            .objects
            .get(&ObjectName::new("", ns))
            .is_some_and(|n| {
                n.metadata.deletion_timestamp.is_none()
                    && n.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
            })
    }

    /// Parses every policy of a live namespace and resolves them onto the Services there;
    /// remembers what each policy's status should say.
    pub(super) fn resolve_policies(&mut self) -> (policy::Resolution, Vec<Rejection>) {
        let resource = ApiResource::erase::<TrafficPolicy>(&());
        let mut parsed = Vec::with_capacity(self.policies.objects.len());
        let mut objects = Vec::with_capacity(self.policies.objects.len());
        for (name, obj) in &self.policies.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            let mut value = serde_json::to_value(obj).unwrap_or_default();
            // List items may come without their type; this watch is of one kind.
            if let Some(map) = value.as_object_mut() {
                map.entry("apiVersion")
                    .or_insert_with(|| resource.api_version.clone().into());
                map.entry("kind")
                    .or_insert_with(|| resource.kind.clone().into());
            }
            parsed.push(policy::parse(&value));
            objects.push(obj);
        }
        let services: BTreeSet<ObjectName> = self
            .services
            .objects
            .keys()
            .filter(|n| self.namespace_live(&n.namespace))
            .cloned()
            .collect();
        let resolution = policy::resolve(&parsed, &services, &|ns| self.namespace_live(ns));
        let mut fresh = Vec::new();
        let mut reported = BTreeMap::new();
        let mut desired = DesiredStatus::new();
        for (p, obj) in parsed.into_iter().zip(objects) {
            if let Some(state) = resolution.report.policies.get(&p.name) {
                desired.insert(
                    p.name.clone(),
                    Desired {
                        condition: policy::status::condition(state),
                        current: policy::status::current_condition(obj),
                        reference: obj.object_ref(&resource),
                    },
                );
            }
            if let Err(error) = p.outcome {
                let message = error.to_string();
                if self.reported.get(&p.name) != Some(&message) {
                    fresh.push(Rejection {
                        policy: p.name.clone(),
                        error,
                    });
                }
                reported.insert(p.name, message);
            }
        }
        self.reported = reported;
        self.desired_status = desired;
        (resolution, fresh)
    }

    /// The complete model, and the policy rejections not reported before.
    pub(super) fn build(&mut self) -> (ClusterModel, Vec<Rejection>) {
        let (resolution, fresh) = self.resolve_policies();
        let mut slices_by_service: BTreeMap<ObjectName, Vec<&StoredSlice>> = BTreeMap::new();
        for (key, slice) in &self.slices.objects {
            if let Some(svc) = &slice.service {
                slices_by_service
                    .entry(ObjectName::new(key.namespace.clone(), svc.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut model = ClusterModel {
            node: self.node.clone(),
            node_zone: self.zone(),
            ..ClusterModel::default()
        };
        // The services and pods are gathered in order and then collected, not inserted one by
        // one: `BTreeMap`'s bulk build fills its nodes, where in-order inserts leave each about
        // half empty (the snapshot keeps these maps; 100,000 pods in the benchmark).
        let mut services = Vec::with_capacity(self.services.objects.len());
        for (name, svc) in &self.services.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            let mut settings = svc.settings();
            if let Some(p) = resolution.settings.get(name) {
                p.apply(&mut settings);
            }
            if !svc.has_spec || svc.cluster_ips.is_empty() {
                continue;
            }
            let distribution = svc.traffic_distribution.as_deref();
            let endpoints = merge_endpoints(
                slices_by_service
                    .get(name)
                    .into_iter()
                    .flatten()
                    .flat_map(|s| {
                        s.endpoints(&self.names, &name.namespace, &svc.ports, distribution)
                    }),
            );
            services.push((
                name.clone(),
                model::Service {
                    name: name.clone(),
                    cluster_ips: svc.cluster_ips.clone(),
                    ports: svc.ports.clone(),
                    settings,
                    endpoints,
                    internal_traffic_policy: svc.internal_traffic_policy,
                },
            ));
        }
        model.services = services.into_iter().collect();
        model.policies = resolution.report;
        self.pods.compact();
        self.build_pods(&mut model);
        for (name, svc) in &self.services.objects {
            if svc.mesh_opt_out && model.services.contains_key(name) {
                model.mesh.opted_out_services.insert(name.clone());
            }
        }
        (model, fresh)
    }

    /// The pods of live namespaces into `model` (whole, or as [`model::OtherPods`]), with the
    /// node addresses they name and the namespaces' dataplane modes (which decide whether
    /// another node's pod is made whole).
    fn build_pods(&self, model: &mut ClusterModel) {
        for (name, ns) in &self.namespaces.objects {
            if self.namespace_live(&name.name)
                && let Some(mode) = crate::authz::DataplaneMode::from_labels(ns.labels())
            {
                model.mesh.namespace_modes.insert(name.name.clone(), mode);
            }
        }
        let mut pods = Vec::new();
        let strings = &self.pods.strings;
        // Node addresses, once per placement (node, address list): most pods are `Other`s
        // sharing one.
        let mut node_addrs: BTreeSet<u32> = BTreeSet::new();
        let add_node = |model: &mut ClusterModel, node: &str, ips: &[IpAddr]| {
            if ips.is_empty() {
                return;
            }
            let addrs = match model.nodes.get_mut(node) {
                Some(a) => a,
                None => model.nodes.entry(node.to_owned()).or_default(),
            };
            for ip in ips {
                if !addrs.contains(ip) {
                    addrs.push(*ip);
                }
            }
        };
        for w in self.pods.store.objects.values() {
            let p = &w.pod;
            if !self.namespace_live(&p.name.namespace) {
                continue;
            }
            // The labels were cut at store time (see `WholePod::labels`).
            if !w.labels.is_empty() {
                model
                    .mesh
                    .pod_labels
                    .insert(p.name.clone(), w.labels.clone());
            }
            add_node(model, &p.node, &w.host_ips);
            pods.push((p.name.clone(), Arc::clone(p)));
        }
        // The other pods: the table as it is when none is left out (the model shares it),
        // else the ones kept, copied.
        let table = &self.pods.others;
        let mut others = Vec::new();
        let mut left_out = false;
        for index in 0..table.len() {
            let (namespace, name) = table.pods.pod(index);
            if !self.namespace_live(namespace) {
                left_out = true;
                continue;
            }
            let o = table.get(index);
            let (node, host_ips) = self.pods.placement(o.placement);
            if node_addrs.insert(o.placement) {
                add_node(model, strings.get(node), self.pods.host_ips.get(host_ips));
            }
            if model.mesh.namespace_modes.contains_key(namespace) {
                // Its namespace is in (or out of) the mesh: the mesh view decides about it,
                // so it is made whole (a copy per model; such namespaces hold a small part of
                // a large cluster's pods).
                left_out = true;
                let name = ObjectName::new(namespace, name);
                pods.push((
                    name.clone(),
                    Arc::new(model::Pod {
                        name,
                        node: strings.get(node).to_string(),
                        service_account: strings.get(o.service_account).to_string(),
                        ips: o.ips().collect(),
                        uid: String::new(),
                        host_network: o.host_network,
                    }),
                ));
            } else {
                others.push((namespace, name, o.v4, o.v6));
            }
        }
        // Gathered in key order (namespace number, name), not name order.
        pods.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        model.pods = pods.into_iter().collect();
        model.other_pods = if left_out {
            Arc::new(model::OtherPods::build(others))
        } else {
            Arc::clone(&table.pods)
        };
    }

    /// Parses every `AuthorizationPolicy` and `PeerAuthentication` of a live namespace into the
    /// model; returns the rejections not reported before and the objects that were rejected
    /// and no longer are (valid again, or gone).
    pub(super) fn security(
        &mut self,
        model: &mut ClusterModel,
    ) -> (Vec<discovery::Rejection>, Vec<(&'static str, ObjectName)>) {
        let authz_resource = ApiResource::erase::<crate::authz::types::AuthorizationPolicy>(&());
        let peer_resource = ApiResource::erase::<crate::authz::types::PeerAuthentication>(&());
        let mut reported = BTreeMap::new();
        let mut fresh = Vec::new();
        let typed = |obj: &DynamicObject, r: &ApiResource| {
            let mut value = serde_json::to_value(obj).unwrap_or_default();
            // List items may come without their type; each watch is of one kind.
            if let Some(map) = value.as_object_mut() {
                map.entry("apiVersion")
                    .or_insert_with(|| r.api_version.clone().into());
                map.entry("kind").or_insert_with(|| r.kind.clone().into());
            }
            value
        };
        let mut note = |kind: &'static str, name: &ObjectName, error: Option<String>| {
            let Some(message) = error else { return };
            let key = (kind, name.clone());
            if self.security_reported.get(&key) != Some(&message) {
                fresh.push(discovery::Rejection::InvalidField {
                    object: ObjectRef::new(kind, name.clone()),
                    field: "spec".to_owned(),
                    message: message.clone(),
                });
            }
            reported.insert(key, message);
        };
        let mut good_authz = BTreeMap::new();
        let mut authz_status = DesiredStatus::new();
        for (name, obj) in &self.authz_policies.objects {
            if self.namespace_live(&name.namespace) {
                let p = crate::authz::parse_authorization(&typed(obj, &authz_resource));
                authz_status.insert(
                    p.name.clone(),
                    security_desired(obj, &authz_resource, p.generation, p.outcome.as_ref().err()),
                );
                note(
                    crate::authz::types::AUTHZ_KIND,
                    &p.name,
                    p.outcome.as_ref().err().map(problems_text),
                );
                let p = keep_last_good(p, &self.last_good_authz, &mut good_authz);
                model.mesh.authorization.push(p);
            }
        }
        self.last_good_authz = good_authz;
        let mut good_peer = BTreeMap::new();
        let mut peer_status = DesiredStatus::new();
        for (name, obj) in &self.peer_authns.objects {
            if self.namespace_live(&name.namespace) {
                let p = crate::authz::parse_peer_authentication(&typed(obj, &peer_resource));
                peer_status.insert(
                    p.name.clone(),
                    security_desired(obj, &peer_resource, p.generation, p.outcome.as_ref().err()),
                );
                note(
                    crate::authz::types::PEER_AUTHN_KIND,
                    &p.name,
                    p.outcome.as_ref().err().map(problems_text),
                );
                let p = keep_last_good(p, &self.last_good_peer, &mut good_peer);
                model.mesh.peer_authentication.push(p);
            }
        }
        self.last_good_peer = good_peer;
        self.authz_status = authz_status;
        self.peer_status = peer_status;
        let resolved = self
            .security_reported
            .keys()
            .filter(|k| !reported.contains_key(*k))
            .cloned()
            .collect();
        self.security_reported = reported;
        (fresh, resolved)
    }
}

/// The `Accepted` condition a security object's status should carry: `True`/`Accepted`, or
/// `False`/`Invalid` with the problems (the last valid version, if any, keeps applying).
pub(super) fn security_desired(
    obj: &DynamicObject,
    resource: &ApiResource,
    generation: Option<i64>,
    error: Option<&crate::authz::ObjectError>,
) -> Desired {
    let (status, reason, message) = match error {
        None => ("True", policy::Reason::Accepted, String::new()),
        Some(e) => ("False", policy::Reason::Invalid, e.to_string()),
    };
    Desired {
        condition: policy::types::PolicyCondition {
            type_: policy::status::CONDITION_ACCEPTED.to_owned(),
            status: status.to_owned(),
            reason: reason.as_str().to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: String::new(),
        },
        current: policy::status::current_condition(obj),
        reference: obj.object_ref(resource),
    }
}

/// A rejected object's problems (`field: reason; …; rejected as a whole`), without the object's
/// name, which the rejection carries.
pub(super) fn problems_text(e: &crate::authz::ObjectError) -> String {
    let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    format!("{}; rejected as a whole", problems.join("; "))
}

/// The object to apply: `p` if valid (remembered in `next`), else its last valid version if it
/// had one (kept in `next`), else `p` itself (invalid: applies nowhere).
pub(super) fn keep_last_good<T: Clone>(
    p: crate::authz::parse::Parsed<T>,
    last: &BTreeMap<ObjectName, crate::authz::parse::Parsed<T>>,
    next: &mut BTreeMap<ObjectName, crate::authz::parse::Parsed<T>>,
) -> crate::authz::parse::Parsed<T> {
    if p.outcome.is_ok() {
        next.insert(p.name.clone(), p.clone());
        return p;
    }
    match last.get(&p.name) {
        Some(good) => {
            next.insert(p.name.clone(), good.clone());
            let mut kept = good.clone();
            kept.superseded_by = p.outcome.err();
            kept
        }
        None => p,
    }
}
