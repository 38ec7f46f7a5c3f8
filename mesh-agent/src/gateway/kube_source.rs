//! Gateway API objects from the Kubernetes API: watches `GatewayClass`, `Gateway`, `HTTPRoute`,
//! `GRPCRoute`, `ReferenceGrant`, TLS `Secret`s, `Namespace`s (their labels, for listeners'
//! `allowedRoutes.namespaces.selector`) and our `RoutePolicy`s (if the CRD is installed), keeps the Gateways whose class names our
//! controller (`GatewayClass.spec.controllerName`, as Envoy Gateway and Istio filter), and
//! compiles them with the file source's compiler ([`config::compile_objects`]) after each
//! batch of changes. Services and endpoints still come from the agent's discovery source.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt as _, stream::select_all};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::config::{self, Doc, GATEWAY_GROUP, GatewayConfig};
use crate::model::ObjectName;

/// Quiet time after a change before compiling (more changes in it join the batch).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a burst of changes may delay a compile.
pub const MAX_BATCH: Duration = Duration::from_secs(1);

/// Why the Kubernetes source stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("the gateway's configuration receiver is gone")]
    ChannelClosed,
    #[error("the watches of Gateway API objects ended")]
    WatchEnded,
}

/// A watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    GatewayClass,
    Gateway,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    Secret,
    Namespace,
    /// Our `RoutePolicy` (`gateway.kernmesh.io`); a cluster without its CRD has none.
    RoutePolicy,
}

impl Kind {
    pub const ALL: [Self; 8] = [
        Self::GatewayClass,
        Self::Gateway,
        Self::HttpRoute,
        Self::GrpcRoute,
        Self::ReferenceGrant,
        Self::Secret,
        Self::Namespace,
        Self::RoutePolicy,
    ];

    /// `(group, version, kind, plural)`.
    #[must_use]
    pub fn gvk(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Self::GatewayClass => (GATEWAY_GROUP, "v1", "GatewayClass", "gatewayclasses"),
            Self::Gateway => (GATEWAY_GROUP, "v1", "Gateway", "gateways"),
            Self::HttpRoute => (GATEWAY_GROUP, "v1", "HTTPRoute", "httproutes"),
            Self::GrpcRoute => (GATEWAY_GROUP, "v1", "GRPCRoute", "grpcroutes"),
            Self::ReferenceGrant => (
                GATEWAY_GROUP,
                "v1beta1",
                "ReferenceGrant",
                "referencegrants",
            ),
            Self::Secret => ("", "v1", "Secret", "secrets"),
            Self::Namespace => ("", "v1", "Namespace", "namespaces"),
            Self::RoutePolicy => (
                "gateway.kernmesh.io",
                "v1alpha1",
                "RoutePolicy",
                "routepolicies",
            ),
        }
    }

    #[must_use]
    pub fn resource(self) -> ApiResource {
        let (g, v, k, plural) = self.gvk();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), plural)
    }

    fn api_version(self) -> String {
        let (g, v, _, _) = self.gvk();
        if g.is_empty() {
            v.to_owned()
        } else {
            format!("{g}/{v}")
        }
    }
}

/// One kind's objects: the live set and, during a (re)list, the set being rebuilt.
#[derive(Default)]
struct Objects {
    live: BTreeMap<ObjectName, DynamicObject>,
    relist: Option<BTreeMap<ObjectName, DynamicObject>>,
    /// The first list is complete (or the kind is not installed).
    ready: bool,
}

fn key(o: &DynamicObject) -> ObjectName {
    ObjectName::new(
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

impl Objects {
    fn apply(&mut self, e: watcher::Event<DynamicObject>) {
        match e {
            watcher::Event::Apply(o) => {
                self.live.insert(key(&o), o);
            }
            watcher::Event::Delete(o) => {
                self.live.remove(&key(&o));
            }
            watcher::Event::Init => self.relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                self.relist.get_or_insert_default().insert(key(&o), o);
            }
            watcher::Event::InitDone => {
                self.live = self.relist.take().unwrap_or_default();
                self.ready = true;
            }
        }
    }
}

/// What the source saw last, for the status writer: every watched object by kind and name
/// (their current `status` is compared with the desired one, so nothing is written twice).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The `GatewayClass`es naming our controller, with their generation.
    pub classes: Vec<(String, Option<i64>)>,
    /// Current `status` of each Gateway, `HTTPRoute`, `GRPCRoute` and class.
    pub status: BTreeMap<(Kind, ObjectName), Value>,
}

/// All watched kinds' objects.
struct State {
    kinds: BTreeMap<Kind, Objects>,
    controller: String,
}

impl State {
    fn ready(&self) -> bool {
        self.kinds.values().all(|o| o.ready)
    }

    fn objects(&self, kind: Kind) -> impl Iterator<Item = &DynamicObject> {
        self.kinds
            .get(&kind)
            .into_iter()
            .flat_map(|o| o.live.values())
    }

    /// The objects the compiler reads: our classes' Gateways, every route and grant, and the
    /// Secrets those Gateways name.
    fn docs(&self) -> (Vec<Doc>, Observed) {
        let mut observed = Observed::default();
        let classes: BTreeSet<String> = self
            .objects(Kind::GatewayClass)
            .filter(|c| {
                c.data
                    .pointer("/spec/controllerName")
                    .and_then(Value::as_str)
                    == Some(self.controller.as_str())
            })
            .filter_map(|c| {
                let name = c.metadata.name.clone()?;
                observed.classes.push((name.clone(), c.metadata.generation));
                Some(name)
            })
            .collect();
        let mut docs = Vec::new();
        let mut secrets = BTreeSet::new();
        let doc = |kind: Kind, o: &DynamicObject| -> Doc {
            let mut value = serde_json::to_value(o).unwrap_or(Value::Null);
            if let Some(m) = value.as_object_mut() {
                m.insert("apiVersion".into(), Value::String(kind.api_version()));
                m.insert("kind".into(), Value::String(kind.gvk().2.to_owned()));
            }
            Doc {
                line: 0,
                kind: kind.gvk().2.to_owned(),
                name: key(o),
                value,
            }
        };
        for g in self.objects(Kind::Gateway) {
            let class = g
                .data
                .pointer("/spec/gatewayClassName")
                .and_then(Value::as_str);
            if !class.is_some_and(|c| classes.contains(c)) {
                continue;
            }
            let ns = g.metadata.namespace.clone().unwrap_or_default();
            for r in g
                .data
                .pointer("/spec/listeners")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|l| l.pointer("/tls/certificateRefs")?.as_array())
                .flatten()
            {
                if let Some(name) = r.get("name").and_then(Value::as_str) {
                    let sns = r.get("namespace").and_then(Value::as_str).unwrap_or(&ns);
                    secrets.insert(ObjectName::new(sns, name));
                }
            }
            observed.status.insert(
                (Kind::Gateway, key(g)),
                g.data.get("status").cloned().unwrap_or(Value::Null),
            );
            docs.push(doc(Kind::Gateway, g));
        }
        for kind in [Kind::HttpRoute, Kind::GrpcRoute] {
            for r in self.objects(kind) {
                observed.status.insert(
                    (kind, key(r)),
                    r.data.get("status").cloned().unwrap_or(Value::Null),
                );
                docs.push(doc(kind, r));
            }
        }
        for g in self.objects(Kind::ReferenceGrant) {
            docs.push(doc(Kind::ReferenceGrant, g));
        }
        for p in self.objects(Kind::RoutePolicy) {
            docs.push(doc(Kind::RoutePolicy, p));
        }
        for s in self.objects(Kind::Secret) {
            if secrets.contains(&key(s)) {
                docs.push(doc(Kind::Secret, s));
            }
        }
        docs.extend(self.objects(Kind::Namespace).filter_map(namespace_doc));
        for c in self.objects(Kind::GatewayClass) {
            if let Some(name) = &c.metadata.name
                && classes.contains(name)
            {
                observed.status.insert(
                    (Kind::GatewayClass, ObjectName::new("", name)),
                    c.data.get("status").cloned().unwrap_or(Value::Null),
                );
            }
        }
        (docs, observed)
    }
}

/// A Namespace by name and labels only (what listeners' namespace selectors read), so other
/// changes to it do not recompile the table.
fn namespace_doc(n: &DynamicObject) -> Option<Doc> {
    let name = n.metadata.name.clone()?;
    Some(Doc {
        line: 0,
        kind: "Namespace".to_owned(),
        name: ObjectName::new("", &name),
        value: serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": n.metadata.labels.clone().unwrap_or_default() },
        }),
    })
}

/// Whether a watch error says the kind is not installed (its CRD missing).
fn not_installed(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Watches the Gateway API through `client`; sends a compiled configuration after each batch
/// of changes once every kind is listed (only when it differs from the last one sent), and the
/// objects' current status on `observed`.
pub async fn run(
    client: kube::Client,
    controller: String,
    configs: mpsc::Sender<GatewayConfig>,
    observed: watch::Sender<Arc<Observed>>,
) -> Result<(), KubeSourceError> {
    let mut streams = select_all(Kind::ALL.map(|kind| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
        let mut cfg = watcher::Config::default().any_semantic();
        cfg.page_size = None;
        if kind == Kind::Secret {
            // Only TLS Secrets: the gateway never reads others (Envoy Gateway watches every
            // Secret; a field selector keeps the cache small on clusters with many).
            cfg = cfg.fields("type=kubernetes.io/tls");
        }
        watcher(api, cfg)
            .default_backoff()
            .map(move |e| (kind, e))
            .boxed()
    }));
    let mut state = State {
        kinds: Kind::ALL.iter().map(|k| (*k, Objects::default())).collect(),
        controller: controller.clone(),
    };
    let mut last: Option<u64> = None;
    let mut missing_logged = BTreeSet::new();
    info!(controller = %controller, "watching Kubernetes: GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes, ReferenceGrants, TLS Secrets, Namespaces, RoutePolicies");
    loop {
        let Some(first) = streams.next().await else {
            return Err(KubeSourceError::WatchEnded);
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + MAX_BATCH;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(DEBOUNCE, streams.next()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) => return Err(KubeSourceError::WatchEnded),
                Err(_) => break,
            }
        }
        for (kind, e) in batch {
            match e {
                Ok(e) => {
                    if let Some(o) = state.kinds.get_mut(&kind) {
                        o.apply(e);
                    }
                }
                Err(e) if not_installed(&e) => {
                    if missing_logged.insert(kind) {
                        warn!(
                            kind = kind.gvk().2,
                            "not installed (no CRD): treated as none"
                        );
                    }
                    if let Some(o) = state.kinds.get_mut(&kind) {
                        o.ready = true;
                    }
                }
                Err(e) => warn!(kind = kind.gvk().2, error = %e, "watch failed; retrying"),
            }
        }
        if !state.ready() {
            continue;
        }
        let (docs, seen) = state.docs();
        observed.send_replace(Arc::new(seen));
        let digest = digest(&docs);
        if last == Some(digest) {
            continue;
        }
        let cfg = tokio::task::spawn_blocking(move || config::compile_objects(docs))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        if configs.send(cfg).await.is_err() {
            return Err(KubeSourceError::ChannelClosed);
        }
        last = Some(digest);
    }
}

/// A digest of what the compiler reads, without `status` and `resourceVersion` (a status
/// write must not recompile the table).
fn digest(docs: &[Doc]) -> u64 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut h = DefaultHasher::new();
    for d in docs {
        let mut v = d.value.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("status");
            if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
                meta.remove("managedFields");
            }
        }
        v.to_string().hash(&mut h);
    }
    h.finish()
}
