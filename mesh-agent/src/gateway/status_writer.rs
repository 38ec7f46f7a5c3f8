//! Writes Gateway API status from the one gateway instance that holds the status Lease
//! (`coordination.k8s.io/v1`, the agent's Lease elector with its own Lease, as Envoy Gateway
//! and Istio elect one status writer): `status.parents[]` of `HTTPRoute`/`GRPCRoute` (our
//! entries, `controllerName` ours; other controllers' entries are kept), `Gateway` conditions
//! and listeners, and the `GatewayClass`'s `Accepted`. Merge patches on the status
//! subresource, only when the desired status differs from the object's (transition times
//! aside), so a steady state writes nothing.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    config::GATEWAY_GROUP,
    kube_source::{Kind, Observed},
    status::{Cond, GatewayInfo, RouteInfo, RoutesReport, reason},
};
use crate::{
    model::ObjectName,
    policy::status::{Elector, RENEW_INTERVAL, RETRY_INTERVAL},
};

/// Default name of the status Lease (in the gateway's namespace).
pub const DEFAULT_LEASE: &str = "kernmesh-gateway-status";
/// Longest condition message written (the API's limit is 32,768).
const MAX_MESSAGE: usize = 1024;

/// Who writes, where the Lease is, and as which controller.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub namespace: String,
    pub identity: String,
    pub lease: String,
    pub controller: String,
    /// `status.addresses` of our Gateways (`--status-address`; empty: not written).
    pub addresses: Vec<String>,
}

fn condition(type_: &str, c: &Cond, generation: Option<i64>) -> Value {
    let mut message = c.message.clone();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    json!({
        "type": type_,
        "status": if c.status { "True" } else { "False" },
        "reason": c.reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
    })
}

/// A copy without `lastTransitionTime` anywhere (what "unchanged" compares).
fn strip_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), strip_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_times).collect()),
        other => other.clone(),
    }
}

/// Sets each condition's `lastTransitionTime`: the current one's when its status is the same
/// (the spec: the time the status last changed), else now.
fn fill_times(conditions: &mut Value, current: Option<&Value>, now: &str) {
    let Some(list) = conditions.as_array_mut() else {
        return;
    };
    for c in list {
        let t = current
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|old| old.get("type") == c.get("type") && old.get("status") == c.get("status"))
            .and_then(|old| old.get("lastTransitionTime"))
            .cloned()
            .unwrap_or_else(|| Value::String(now.to_owned()));
        if let Some(m) = c.as_object_mut() {
            m.insert("lastTransitionTime".into(), t);
        }
    }
}

fn parent_ref(p: &super::status::ParentInfo) -> Value {
    let mut r = json!({
        "group": GATEWAY_GROUP,
        "kind": "Gateway",
        "namespace": p.gateway.namespace,
        "name": p.gateway.name,
    });
    if let Some(s) = &p.section {
        r["sectionName"] = json!(s);
    }
    if let Some(port) = p.port {
        r["port"] = json!(port);
    }
    r
}

/// A route's desired `status`: other controllers' parents kept, ours replaced.
fn route_status(r: &RouteInfo, controller: &str, current: &Value, now: &str) -> Value {
    let old_parents: Vec<Value> = current
        .get("parents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut parents: Vec<Value> = old_parents
        .iter()
        .filter(|p| p.get("controllerName").and_then(Value::as_str) != Some(controller))
        .cloned()
        .collect();
    for p in &r.parents {
        let pref = parent_ref(p);
        let mut conditions = json!([
            condition(reason::ACCEPTED, &p.accepted, r.generation),
            condition(reason::RESOLVED_REFS, &r.resolved_refs, r.generation),
        ]);
        let old = old_parents.iter().find(|o| {
            o.get("controllerName").and_then(Value::as_str) == Some(controller)
                && o.get("parentRef") == Some(&pref)
        });
        fill_times(&mut conditions, old.and_then(|o| o.get("conditions")), now);
        parents.push(json!({
            "parentRef": pref,
            "controllerName": controller,
            "conditions": conditions,
        }));
    }
    json!({ "parents": parents })
}

/// A Gateway's desired `status`.
fn gateway_status(g: &GatewayInfo, addresses: &[String], current: &Value, now: &str) -> Value {
    let programmed = |ok: bool, why: &str| {
        if ok {
            Cond::yes(reason::PROGRAMMED)
        } else {
            Cond::no(reason::INVALID, why)
        }
    };
    let mut listeners = Vec::new();
    let mut any = false;
    for l in &g.listeners {
        let ok = l.accepted.status && l.resolved_refs.status;
        any |= ok;
        let mut conditions = json!([
            condition(reason::ACCEPTED, &l.accepted, g.generation),
            condition(
                reason::PROGRAMMED,
                &programmed(ok, "the listener is not valid"),
                g.generation
            ),
            condition(reason::RESOLVED_REFS, &l.resolved_refs, g.generation),
        ]);
        let old = current
            .get("listeners")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|o| o.get("name").and_then(Value::as_str) == Some(l.name.as_str()));
        fill_times(&mut conditions, old.and_then(|o| o.get("conditions")), now);
        listeners.push(json!({
            "name": l.name,
            "supportedKinds": [
                { "group": GATEWAY_GROUP, "kind": "HTTPRoute" },
                { "group": GATEWAY_GROUP, "kind": "GRPCRoute" },
            ],
            "attachedRoutes": l.attached_routes,
            "conditions": conditions,
        }));
    }
    let mut conditions = json!([
        condition(reason::ACCEPTED, &g.accepted, g.generation),
        condition(
            reason::PROGRAMMED,
            &programmed(any, "no listener is valid"),
            g.generation
        ),
    ]);
    fill_times(&mut conditions, current.get("conditions"), now);
    let mut status = json!({ "conditions": conditions, "listeners": listeners });
    if !addresses.is_empty() {
        status["addresses"] = addresses
            .iter()
            .map(|a| {
                let type_ = if a.parse::<std::net::IpAddr>().is_ok() {
                    "IPAddress"
                } else {
                    "Hostname"
                };
                json!({ "type": type_, "value": a })
            })
            .collect();
    }
    status
}

/// Every object's desired status.
fn desired(
    report: &RoutesReport,
    observed: &Observed,
    cfg: &WriterConfig,
    now: &str,
) -> BTreeMap<(Kind, ObjectName), Value> {
    let mut out = BTreeMap::new();
    let current = |k: Kind, n: &ObjectName| {
        observed
            .status
            .get(&(k, n.clone()))
            .cloned()
            .unwrap_or(Value::Null)
    };
    for r in &report.routes {
        let kind = if r.kind == "GRPCRoute" {
            Kind::GrpcRoute
        } else {
            Kind::HttpRoute
        };
        let cur = current(kind, &r.name);
        out.insert(
            (kind, r.name.clone()),
            route_status(r, &cfg.controller, &cur, now),
        );
    }
    // Routes that no longer name a Gateway of ours: our old entries are removed (the spec:
    // a controller keeps only its current parents in the list).
    for ((kind, name), status) in &observed.status {
        if !matches!(kind, Kind::HttpRoute | Kind::GrpcRoute)
            || out.contains_key(&(*kind, name.clone()))
        {
            continue;
        }
        let parents = status.get("parents").and_then(Value::as_array);
        let ours = |p: &&Value| {
            p.get("controllerName").and_then(Value::as_str) == Some(cfg.controller.as_str())
        };
        if parents.is_some_and(|ps| ps.iter().any(|p| ours(&p))) {
            let kept: Vec<Value> = parents
                .into_iter()
                .flatten()
                .filter(|p| !ours(p))
                .cloned()
                .collect();
            out.insert((*kind, name.clone()), json!({ "parents": kept }));
        }
    }
    for g in &report.gateways {
        let cur = current(Kind::Gateway, &g.name);
        out.insert(
            (Kind::Gateway, g.name.clone()),
            gateway_status(g, &cfg.addresses, &cur, now),
        );
    }
    for (class, generation) in &observed.classes {
        let name = ObjectName::new("", class);
        let cur = current(Kind::GatewayClass, &name);
        let mut conditions = json!([condition(
            reason::ACCEPTED,
            &Cond::yes(reason::ACCEPTED),
            *generation
        )]);
        fill_times(&mut conditions, cur.get("conditions"), now);
        out.insert(
            (Kind::GatewayClass, name),
            json!({ "conditions": conditions }),
        );
    }
    out
}

/// Stands for election and, while holding the Lease, writes the status `reports` asks for.
/// Returns when the report sender is gone.
pub async fn run(
    client: kube::Client,
    cfg: WriterConfig,
    mut reports: watch::Receiver<Arc<RoutesReport>>,
    mut observed: watch::Receiver<Arc<Observed>>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut elector = Elector::new(cfg.identity.clone(), &cfg.lease);
    // What was written last, so a write is not repeated before the watch shows it.
    let mut written: BTreeMap<(Kind, ObjectName), Value> = BTreeMap::new();
    let mut last_try: Option<Instant> = None;
    info!(namespace = %cfg.namespace, identity = %cfg.identity, lease = %cfg.lease, "gateway status: standing for election");
    loop {
        let interval = if elector.leading() {
            RENEW_INTERVAL
        } else {
            RETRY_INTERVAL
        };
        if last_try.is_none_or(|t| t.elapsed() >= interval) {
            last_try = Some(Instant::now());
            let was = elector.leading();
            if let Err(e) = elector.try_acquire_or_renew(&leases).await {
                warn!(lease = %cfg.lease, error = %e, "gateway status: Lease not renewed");
            }
            if was && !elector.leading() {
                info!(lease = %cfg.lease, "gateway status: no longer the writer");
                written.clear();
            }
        }
        if elector.leading() {
            let report = Arc::clone(&reports.borrow_and_update());
            let seen = Arc::clone(&observed.borrow_and_update());
            write(&client, &cfg, &report, &seen, &mut written).await;
        }
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            r = observed.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    }
}

async fn write(
    client: &kube::Client,
    cfg: &WriterConfig,
    report: &RoutesReport,
    observed: &Observed,
    written: &mut BTreeMap<(Kind, ObjectName), Value>,
) {
    let now = Timestamp::now().to_string();
    let want = desired(report, observed, cfg, &now);
    written.retain(|k, _| want.contains_key(k));
    for ((kind, name), status) in want {
        let key = (kind, name);
        let bare = strip_times(&status);
        let current = observed.status.get(&key).map(strip_times);
        if current.as_ref() == Some(&bare) {
            written.remove(&key);
            continue;
        }
        if written.get(&key) == Some(&bare) {
            continue;
        }
        let (kind, name) = &key;
        let resource = kind.resource();
        let api: Api<DynamicObject> = if name.namespace.is_empty() {
            Api::all_with(client.clone(), &resource)
        } else {
            Api::namespaced_with(client.clone(), &name.namespace, &resource)
        };
        let patch = json!({ "status": status });
        match api
            .patch_status(&name.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                debug!(kind = kind.gvk().2, object = %name, "gateway status written");
                written.insert(key, bare);
            }
            Err(e) => {
                warn!(kind = kind.gvk().2, object = %name, error = %e, "gateway status not written; retrying");
            }
        }
    }
}
