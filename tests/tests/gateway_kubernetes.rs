//! The gateway with its Gateway API objects from Kubernetes: the real `mesh-agent gateway
//! --kubernetes` process watches the API stand-in (`tests/kmock/server.py`) for
//! `GatewayClass`es, `Gateway`s, `HTTPRoute`s and their backends' Services and
//! `EndpointSlice`s, and routes real HTTP requests to echo backends on loopback addresses.
//! No kernel needed. Build first: `cargo build -p mesh-agent --bins`.
//!
//! - `routes_and_status_from_kubernetes`: routes applied to the API route requests (HTTP, and
//!   HTTPS with a TLS Secret from the API); a bad route, one with a missing backend (also a
//!   `GRPCRoute`), one with a cross-namespace reference without a `ReferenceGrant`, one naming
//!   no listener and one from a namespace the listener does not admit get
//!   `Accepted`/`ResolvedRefs` False with the spec's reasons while the good one serves;
//!   another controller's Gateway is neither served nor given status; a route changed under
//!   load fails no request; nothing is written while nothing changes; `meshctl routes` shows
//!   it all.
//! - `route_status_has_one_writer_and_fails_over`: of two gateways only the Lease holder
//!   writes status; when it dies the other takes over.
//! - `meshctl_routes_in_file_mode`: the same report from a routes file.

#![expect(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read best top to bottom"
)]

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use mesh_agent::discovery::kubernetes::{
    SERVICE_NAME_LABEL,
    k8s_openapi::api::coordination::v1::Lease,
    kube::{
        self, Api,
        api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    },
};
use mesh_tests::{agent::workspace_binary, gateway::Backend, kmock::Kmock};
use serde_json::{Value, json};

const NS: &str = "shop";
const GW_NS: &str = "mesh-system";
const CONTROLLER: &str = "kernmesh.io/gateway-controller";
const CONVERGE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn work(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-gwk8s-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `mesh-agent gateway --kubernetes` process, killed on drop.
struct Gateway {
    child: Child,
    log: std::path::PathBuf,
    metrics: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &Path, kubeconfig: &Path, id: &str, listen: &str) -> Self {
        let log = dir.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let metrics = free_port();
        let child = Command::new(workspace_binary("mesh-agent").unwrap())
            .args(["gateway", "--kubernetes", "--listen-address", listen])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args([
                "--pod-name",
                id,
                "--pod-namespace",
                GW_NS,
                "--node-name",
                "gateway",
            ])
            .args(["--status-address", "192.0.2.10", "--access-log", "false"])
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                "warn,mesh_agent::gateway::status_writer=debug,mesh_agent::policy::status=info",
            )
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting mesh-agent gateway");
        Self {
            child,
            log,
            metrics,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn writes(&self) -> usize {
        self.log_text().matches("gateway status written").count()
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

struct Api2 {
    client: kube::Client,
}

impl Api2 {
    fn api(&self, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let (g, v, plural) = match kind {
            "GatewayClass" => ("gateway.networking.k8s.io", "v1", "gatewayclasses"),
            "Gateway" => ("gateway.networking.k8s.io", "v1", "gateways"),
            "HTTPRoute" => ("gateway.networking.k8s.io", "v1", "httproutes"),
            "GRPCRoute" => ("gateway.networking.k8s.io", "v1", "grpcroutes"),
            "Service" => ("", "v1", "services"),
            "EndpointSlice" => ("discovery.k8s.io", "v1", "endpointslices"),
            "Namespace" => ("", "v1", "namespaces"),
            "Secret" => ("", "v1", "secrets"),
            "RoutePolicy" => ("gateway.kernmesh.io", "v1alpha1", "routepolicies"),
            other => panic!("no resource for {other}"),
        };
        let r = resource(g, v, kind, plural);
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &r),
            None => Api::all_with(self.client.clone(), &r),
        }
    }

    async fn create(&self, kind: &str, ns: Option<&str>, obj: Value) {
        let o: DynamicObject = serde_json::from_value(obj).unwrap();
        self.api(kind, ns)
            .create(&PostParams::default(), &o)
            .await
            .unwrap_or_else(|e| panic!("create {kind}: {e}"));
    }

    async fn patch(&self, kind: &str, ns: Option<&str>, name: &str, patch: Value) {
        self.api(kind, ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap_or_else(|e| panic!("patch {kind} {name}: {e}"));
    }

    async fn get(&self, kind: &str, ns: Option<&str>, name: &str) -> Value {
        let o = self.api(kind, ns).get(name).await.unwrap();
        serde_json::to_value(o).unwrap()
    }
}

fn gateway_api(group_version: &str, kind: &str, name: &str, ns: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": group_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": ns },
        "spec": spec,
    })
}

fn route(name: &str, spec: &Value) -> Value {
    route_in(NS, name, spec)
}

fn route_in(ns: &str, name: &str, spec: &Value) -> Value {
    gateway_api("gateway.networking.k8s.io/v1", "HTTPRoute", name, ns, spec)
}

/// Service `name` (port 80) with one slice whose endpoints are `backends` (port `port`).
async fn service(api: &Api2, name: &str, vip: &str, backends: &[SocketAddr]) {
    api.create(
        "Service",
        Some(NS),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": NS },
            "spec": { "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                      "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }] },
        }),
    )
    .await;
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|b| json!({ "addresses": [b.ip().to_string()], "conditions": { "ready": true } }))
        .collect();
    api.create(
        "EndpointSlice",
        Some(NS),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": format!("{name}-x1"), "namespace": NS,
                          "labels": { SERVICE_NAME_LABEL: name } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": backends[0].port(), "protocol": "TCP" }],
            "endpoints": endpoints,
        }),
    )
    .await;
}

/// The cluster every test starts from: namespaces, our class and another controller's.
async fn base(api: &Api2) {
    for ns in [NS, GW_NS, "other"] {
        api.create(
            "Namespace",
            None,
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
        )
        .await;
    }
    for (name, controller) in [("kernmesh", CONTROLLER), ("other", "example.com/other")] {
        api.create(
            "GatewayClass",
            None,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": { "name": name },
                "spec": { "controllerName": controller },
            }),
        )
        .await;
    }
}

async fn gateway(api: &Api2, name: &str, class: &str, port: u16) {
    api.create(
        "Gateway",
        Some(NS),
        gateway_api(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            name,
            NS,
            &json!({ "gatewayClassName": class,
                    "listeners": [{ "name": "http", "port": port, "protocol": "HTTP" }] }),
        ),
    )
    .await;
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn get(c: &HttpClient, addr: &str, port: u16, host: &str) -> (u16, String) {
    let req = http::Request::builder()
        .uri(format!("http://{addr}:{port}/"))
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    match c.request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r
                .into_body()
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Our entry of `status.parents` of route `name`, as `(Accepted reason, ResolvedRefs reason)`.
async fn route_reasons(api: &Api2, name: &str) -> Option<(String, String, Value)> {
    route_reasons_in(api, NS, name).await
}

async fn route_reasons_in(api: &Api2, ns: &str, name: &str) -> Option<(String, String, Value)> {
    kind_reasons(api, "HTTPRoute", ns, name).await
}

async fn kind_reasons(
    api: &Api2,
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<(String, String, Value)> {
    let r = api.get(kind, Some(ns), name).await;
    let p = r["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER)?
        .clone();
    let reason = |t: &str| {
        p["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .map(|c| {
                format!(
                    "{}/{}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default()
    };
    Some((reason("Accepted"), reason("ResolvedRefs"), p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_status_from_kubernetes() {
    let dir = work("routes");
    let kmock = Kmock::start(&dir, None).expect("kmock");
    let kubeconfig = kmock.kubeconfig(&dir).unwrap();
    let api = Api2 {
        client: kube::Client::try_from(kube::Config::new(kmock.url.parse().unwrap())).unwrap(),
    };
    let v1 = Backend::start("v1", "127.0.61.1:18080".parse().unwrap())
        .await
        .unwrap();
    let v2 = Backend::start("v2", "127.0.61.2:18080".parse().unwrap())
        .await
        .unwrap();
    base(&api).await;
    service(&api, "web-v1", "10.96.61.1", &[v1.addr]).await;
    service(&api, "web-v2", "10.96.61.2", &[v2.addr]).await;
    let port = free_port();
    let tls_port = free_port();
    let foreign_port = free_port();
    let shared_port = free_port();
    gateway(&api, "gw", "kernmesh", port).await;
    // An HTTPS listener whose certificate is a TLS Secret from the API.
    let cert = rcgen::generate_simple_self_signed(vec!["web.example".to_owned()]).unwrap();
    let secret = mesh_agent::discovery::kubernetes::k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("web-cert".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt", cert.cert.pem()),
                ("tls.key", cert.signing_key.serialize_pem()),
            ]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_owned(),
                    mesh_agent::discovery::kubernetes::k8s_openapi::ByteString(v.into_bytes()),
                )
            })
            .collect(),
        ),
        ..Default::default()
    };
    let mut secret = serde_json::to_value(&secret).unwrap();
    secret["apiVersion"] = json!("v1");
    secret["kind"] = json!("Secret");
    api.create("Secret", Some(NS), secret).await;
    api.patch(
        "Gateway",
        Some(NS),
        "gw",
        json!({ "spec": { "listeners": [
            { "name": "http", "port": port, "protocol": "HTTP" },
            { "name": "https", "port": tls_port, "protocol": "HTTPS",
              "tls": { "certificateRefs": [{ "name": "web-cert" }] } },
            // Routes of namespaces labelled for it (none at first).
            { "name": "shared", "port": shared_port, "protocol": "HTTP",
              "allowedRoutes": { "namespaces": { "from": "Selector",
                  "selector": { "matchLabels": { "gateway-access": "granted" } } } } },
        ] } }),
    )
    .await;
    gateway(&api, "foreign", "other", foreign_port).await;
    let parent = json!([{ "name": "gw" }]);
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "web",
            &json!({
                "parentRefs": parent, "hostnames": ["web.example"],
                "rules": [{ "backendRefs": [{ "name": "web-v1", "port": 80 }] }],
            }),
        ),
    )
    .await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "bad",
            &json!({
                "parentRefs": parent, "hostnames": ["bad.example"],
                "rules": [{ "matches": [{ "path": { "type": "Exact", "value": "nope" } }],
                            "backendRefs": [{ "name": "web-v1", "port": 80 }] }],
            }),
        ),
    )
    .await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "ghost",
            &json!({
                "parentRefs": parent, "hostnames": ["ghost.example"],
                "rules": [{ "backendRefs": [{ "name": "ghost", "port": 80 }] }],
            }),
        ),
    )
    .await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "cross",
            &json!({
                "parentRefs": parent, "hostnames": ["cross.example"],
                "rules": [{ "backendRefs": [{ "name": "api", "namespace": "other", "port": 80 }] }],
            }),
        ),
    )
    .await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "nolistener",
            &json!({
                "parentRefs": [{ "name": "gw", "sectionName": "nope" }],
                "rules": [{ "backendRefs": [{ "name": "web-v1", "port": 80 }] }],
            }),
        ),
    )
    .await;
    // A GRPCRoute whose Service does not exist (status on grpcroutes).
    api.create(
        "GRPCRoute",
        Some(NS),
        gateway_api(
            "gateway.networking.k8s.io/v1",
            "GRPCRoute",
            "grpc",
            NS,
            &json!({
                "parentRefs": [{ "name": "gw", "sectionName": "http" }],
                "hostnames": ["grpc.example"],
                "rules": [{ "backendRefs": [{ "name": "ghost-grpc", "port": 80 }] }],
            }),
        ),
    )
    .await;
    // From another namespace: the listener admits its own namespace only (the default).
    api.create(
        "HTTPRoute",
        Some("other"),
        route_in(
            "other",
            "elsewhere",
            &json!({
                "parentRefs": [{ "name": "gw", "namespace": NS }],
                "hostnames": ["elsewhere.example"],
                "rules": [{ "backendRefs": [{ "name": "web-v1", "namespace": NS, "port": 80 }] }],
            }),
        ),
    )
    .await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "theirs",
            &json!({
                "parentRefs": [{ "name": "foreign" }],
                "rules": [{ "backendRefs": [{ "name": "web-v1", "port": 80 }] }],
            }),
        ),
    )
    .await;

    let gw = Gateway::start(&dir, &kubeconfig, "gw-a", "127.0.0.1");
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    wait_for("the route from the API serves", CONVERGE, || async {
        get(&c, "127.0.0.1", port, "web.example").await.1 == "v1 GET /"
    })
    .await;
    // Over TLS with the Secret's certificate (curl, as a client would).
    let curl = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--resolve"])
        .arg(format!("web.example:{tls_port}:127.0.0.1"))
        .arg(format!("https://web.example:{tls_port}/"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "v1 GET /",
        "{curl:?}"
    );
    // The bad route is left out (unknown host → 404); the good one keeps serving.
    assert_eq!(get(&c, "127.0.0.1", port, "bad.example").await.0, 404);
    // A missing Service: the rule exists, no endpoints → 503; a reference not permitted → 500.
    assert_eq!(get(&c, "127.0.0.1", port, "ghost.example").await.0, 503);
    assert_eq!(get(&c, "127.0.0.1", port, "cross.example").await.0, 500);
    // Another controller's Gateway is not served.
    assert_eq!(get(&c, "127.0.0.1", foreign_port, "web.example").await.0, 0);

    let expect = [
        ("web", "True/Accepted", "True/ResolvedRefs"),
        ("bad", "False/UnsupportedValue", "True/ResolvedRefs"),
        ("ghost", "True/Accepted", "False/BackendNotFound"),
        ("cross", "True/Accepted", "False/RefNotPermitted"),
        ("nolistener", "False/NoMatchingParent", "True/ResolvedRefs"),
    ];
    for (name, accepted, resolved) in expect {
        wait_for(&format!("status of {name}"), CONVERGE, || async {
            route_reasons(&api, name)
                .await
                .is_some_and(|(a, r, _)| a == accepted && r == resolved)
        })
        .await;
        let (_, _, p) = route_reasons(&api, name).await.unwrap();
        assert_eq!(p["parentRef"]["name"], "gw", "{p}");
        for c in p["conditions"].as_array().unwrap() {
            assert_eq!(c["observedGeneration"], 1, "{c}");
            assert!(
                c["lastTransitionTime"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty()),
                "{c}"
            );
        }
    }
    wait_for("status of the GRPCRoute", CONVERGE, || async {
        kind_reasons(&api, "GRPCRoute", NS, "grpc")
            .await
            .is_some_and(|(a, r, _)| a == "True/Accepted" && r == "False/BackendNotFound")
    })
    .await;
    wait_for("status of elsewhere", CONVERGE, || async {
        route_reasons_in(&api, "other", "elsewhere")
            .await
            .is_some_and(|(a, _, _)| a == "False/NotAllowedByListeners")
    })
    .await;
    assert_eq!(get(&c, "127.0.0.1", port, "elsewhere.example").await.0, 404);
    let bad = route_reasons(&api, "bad").await.unwrap().2;
    let message = bad["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("HTTPRoute shop/bad")
            && message.contains("spec.rules[0].matches[0].path.value")
            && message.contains("must start with /"),
        "{message}"
    );
    // The foreign Gateway's route and the foreign Gateway get nothing from us.
    let theirs = api.get("HTTPRoute", Some(NS), "theirs").await;
    assert!(
        theirs["status"]["parents"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{theirs}"
    );
    let foreign = api.get("Gateway", Some(NS), "foreign").await;
    assert!(
        foreign["status"].is_null() || foreign["status"]["conditions"].is_null(),
        "{foreign}"
    );
    // Our Gateway: Accepted/Programmed, the listeners with their attached routes (http: web,
    // ghost, cross and the GRPCRoute; https: the first three; the bad route, the one naming
    // no listener and the one from another namespace are not attached), addresses.
    wait_for("Gateway status", CONVERGE, || async {
        let g = api.get("Gateway", Some(NS), "gw").await;
        g["status"]["listeners"][0]["attachedRoutes"] == 4
    })
    .await;
    let g = api.get("Gateway", Some(NS), "gw").await;
    let conds = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{}={}",
                    c["type"].as_str().unwrap(),
                    c["status"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        conds(&g["status"]["conditions"]),
        ["Accepted=True", "Programmed=True"],
        "{g}"
    );
    assert_eq!(g["status"]["listeners"][1]["attachedRoutes"], 3, "{g}");
    assert_eq!(
        conds(&g["status"]["listeners"][1]["conditions"]),
        ["Accepted=True", "Programmed=True", "ResolvedRefs=True"],
        "{g}"
    );
    assert_eq!(
        conds(&g["status"]["listeners"][0]["conditions"]),
        ["Accepted=True", "Programmed=True", "ResolvedRefs=True"],
        "{g}"
    );
    assert_eq!(g["status"]["addresses"][0]["value"], "192.0.2.10");
    let class = api.get("GatewayClass", None, "kernmesh").await;
    assert_eq!(
        conds(&class["status"]["conditions"]),
        ["Accepted=True"],
        "{class}"
    );
    let other = api.get("GatewayClass", None, "other").await;
    assert!(other["status"].is_null(), "{other}");

    // Nothing changes: nothing is written (resource versions stay).
    let version = |v: &Value| v["metadata"]["resourceVersion"].clone();
    let before = version(&api.get("HTTPRoute", Some(NS), "web").await);
    let gw_before = version(&api.get("Gateway", Some(NS), "gw").await);
    let writes = gw.writes();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        before,
        version(&api.get("HTTPRoute", Some(NS), "web").await)
    );
    assert_eq!(
        gw_before,
        version(&api.get("Gateway", Some(NS), "gw").await)
    );
    assert_eq!(writes, gw.writes(), "status rewritten without a change");

    // The same report on the admin endpoint, and through `meshctl routes`.
    let (code, body) = get(&c, "127.0.0.1", gw.metrics, "x").await;
    assert_eq!(code, 404, "{body}");
    let req = http::Request::builder()
        .uri(format!("http://127.0.0.1:{}/routes", gw.metrics))
        .body(Empty::new())
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["source"], "kubernetes");
    let web = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "shop/web")
        .unwrap();
    assert_eq!(
        web["rules"][0]["backends"][0]["target"], "shop/web-v1:80",
        "{web}"
    );
    let out = Command::new(workspace_binary("meshctl").unwrap())
        .args([
            "routes",
            "--gateway",
            &format!("http://127.0.0.1:{}", gw.metrics),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "HTTPRoute shop/web",
        "shop/web-v1:80",
        "BackendNotFound",
        "UnsupportedValue",
        "NoMatchingParent",
        "RefNotPermitted",
        "web.example",
    ] {
        assert!(
            text.contains(want),
            "meshctl routes lacks {want:?}:\n{text}"
        );
    }

    // A route changed under load: v1 → weights 0/1 (all to v2); no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, stop, failures, done) = (c.clone(), stop.clone(), failures.clone(), done.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (code, body) = get(&c, "127.0.0.1", port, "web.example").await;
                if code != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed under reload: {code} {body}");
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.patch("HTTPRoute", Some(NS), "web", json!({ "spec": { "rules": [{ "backendRefs": [
        { "name": "web-v1", "port": 80, "weight": 0 }, { "name": "web-v2", "port": 80, "weight": 1 }] }] } })).await;
    wait_for("the changed route serves v2", CONVERGE, || async {
        get(&c, "127.0.0.1", port, "web.example").await.1 == "v2 GET /"
    })
    .await;
    // A bad version of the same route: rejected, the rest of the table keeps serving.
    api.patch(
        "HTTPRoute",
        Some(NS),
        "bad",
        json!({ "spec": { "rules": [{ "backendRefs": [{ "name": "web-v2", "port": 80 }] }] } }),
    )
    .await;
    wait_for(
        "the fixed route serves and is Accepted",
        CONVERGE,
        || async {
            get(&c, "127.0.0.1", port, "bad.example").await.1 == "v2 GET /"
                && route_reasons(&api, "bad")
                    .await
                    .is_some_and(|(a, _, _)| a == "True/Accepted")
        },
    )
    .await;
    // Both routes' specs changed once: the API server bumped their generation, and the status
    // reports the generation it was computed from.
    for name in ["web", "bad"] {
        wait_for(
            &format!("{name}'s status at generation 2"),
            CONVERGE,
            || async {
                let r = api.get("HTTPRoute", Some(NS), name).await;
                let Some((_, _, p)) = route_reasons(&api, name).await else {
                    return false;
                };
                r["metadata"]["generation"] == 2
                    && p["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().all(|c| c["observedGeneration"] == 2))
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    assert!(n > 100, "only {n} requests under load");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {n} requests under route changes"
    );
    // A route moved to another controller's Gateway: our entry leaves its status.
    api.patch(
        "HTTPRoute",
        Some(NS),
        "ghost",
        json!({ "spec": { "parentRefs": [{ "name": "foreign" }] } }),
    )
    .await;
    wait_for("our parent entry removed", CONVERGE, || async {
        let r = api.get("HTTPRoute", Some(NS), "ghost").await;
        r["status"]["parents"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["controllerName"] != CONTROLLER))
    })
    .await;
    // The namespace of `elsewhere` gets the label the `shared` listener selects: the route is
    // admitted there (the Namespace watch recompiles the table) and only there (`http` still
    // admits its own namespace only). Its backend is in another namespace without a
    // ReferenceGrant, so it answers 500 — attached, not the 404 of no route.
    api.patch(
        "Namespace",
        None,
        "other",
        json!({ "metadata": { "labels": { "gateway-access": "granted" } } }),
    )
    .await;
    wait_for(
        "elsewhere admitted by the namespace selector",
        CONVERGE,
        || async {
            route_reasons_in(&api, "other", "elsewhere")
                .await
                .is_some_and(|(a, _, _)| a == "True/Accepted")
        },
    )
    .await;
    wait_for(
        "elsewhere attached to the shared listener",
        CONVERGE,
        || async {
            get(&c, "127.0.0.1", shared_port, "elsewhere.example")
                .await
                .0
                == 500
        },
    )
    .await;
    assert_eq!(get(&c, "127.0.0.1", port, "elsewhere.example").await.0, 404);

    // A RoutePolicy from the API (our CRD): a rate limit on `bad` (serving v2 by now) of 2
    // requests a minute — the third is refused with 429 — while `web` is untouched.
    for _ in 0..3 {
        assert_eq!(get(&c, "127.0.0.1", port, "bad.example").await.0, 200);
    }
    api.create(
        "RoutePolicy",
        Some(NS),
        gateway_api(
            mesh_agent::gateway::config::POLICY_API_VERSION,
            "RoutePolicy",
            "slow-down",
            NS,
            &json!({
                "targetRefs": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "bad" }],
                "rateLimit": { "route": { "requests": 2, "per": "1m" } },
            }),
        ),
    )
    .await;
    wait_for("the RoutePolicy limits its route", CONVERGE, || async {
        let codes = [
            get(&c, "127.0.0.1", port, "bad.example").await.0,
            get(&c, "127.0.0.1", port, "bad.example").await.0,
            get(&c, "127.0.0.1", port, "bad.example").await.0,
        ];
        codes.contains(&429)
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(&c, "127.0.0.1", port, "web.example").await.0, 200);
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_status_has_one_writer_and_fails_over() {
    let dir = work("election");
    let kmock = Kmock::start(&dir, None).expect("kmock");
    let kubeconfig = kmock.kubeconfig(&dir).unwrap();
    let client = kube::Client::try_from(kube::Config::new(kmock.url.parse().unwrap())).unwrap();
    let api = Api2 {
        client: client.clone(),
    };
    let leases: Api<Lease> = Api::namespaced(client, GW_NS);
    let v1 = Backend::start("v1", "127.0.62.1:18080".parse().unwrap())
        .await
        .unwrap();
    base(&api).await;
    service(&api, "web-v1", "10.96.62.1", &[v1.addr]).await;
    let port = free_port();
    gateway(&api, "gw", "kernmesh", port).await;
    api.create(
        "HTTPRoute",
        Some(NS),
        route(
            "web",
            &json!({
                "parentRefs": [{ "name": "gw" }],
                "rules": [{ "backendRefs": [{ "name": "web-v1", "port": 80 }] }],
            }),
        ),
    )
    .await;
    let holder = || async {
        leases
            .get("kernmesh-gateway-status")
            .await
            .ok()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let a = Gateway::start(&dir, &kubeconfig, "gw-a", "127.0.0.1");
    wait_for("gw-a writes status", CONVERGE, || async {
        route_reasons(&api, "web")
            .await
            .is_some_and(|(a, r, _)| a == "True/Accepted" && r == "True/ResolvedRefs")
    })
    .await;
    assert_eq!(holder().await, "gw-a");
    let b = Gateway::start(&dir, &kubeconfig, "gw-b", "127.0.0.2");
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    wait_for("gw-b serves too", CONVERGE, || async {
        get(&c, "127.0.0.2", port, "any").await.1 == "v1 GET /"
    })
    .await;
    // A change both see: only the holder writes it.
    api.patch(
        "HTTPRoute",
        Some(NS),
        "web",
        json!({ "spec": { "rules": [{ "backendRefs": [
        { "name": "web-v1", "port": 80 }, { "name": "missing", "port": 80 }] }] } }),
    )
    .await;
    wait_for("the change is written", CONVERGE, || async {
        route_reasons(&api, "web")
            .await
            .is_some_and(|(_, r, _)| r == "False/BackendNotFound")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.writes() >= 2, "gw-a:\n{}", a.log_text());
    assert_eq!(
        b.writes(),
        0,
        "gw-b wrote while gw-a held the Lease:\n{}",
        b.log_text()
    );
    assert_eq!(holder().await, "gw-a");
    // gw-a dies without releasing: gw-b takes over after the Lease expires and writes the
    // next change.
    drop(a);
    wait_for(
        "gw-b takes the Lease over",
        Duration::from_secs(15) + CONVERGE,
        || async { holder().await == "gw-b" },
    )
    .await;
    api.patch(
        "HTTPRoute",
        Some(NS),
        "web",
        json!({ "spec": { "rules": [{ "backendRefs": [
        { "name": "web-v1", "port": 80 }] }] } }),
    )
    .await;
    wait_for("gw-b writes the next change", CONVERGE, || async {
        route_reasons(&api, "web")
            .await
            .is_some_and(|(_, r, _)| r == "True/ResolvedRefs")
    })
    .await;
    assert!(b.writes() >= 1, "gw-b:\n{}", b.log_text());
}

/// File mode: `meshctl routes` shows what the same compiler judged (no API server, no status
/// written): an accepted route with its weighted backends, and a cross-namespace reference
/// refused as `RefNotPermitted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_routes_in_file_mode() {
    let dir = work("file");
    let port = free_port();
    let metrics = free_port();
    let routes = format!(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: kernmesh
  listeners: [{{ name: http, port: {port}, protocol: HTTP }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: canary, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [canary.example]
  rules:
    - matches: [{{ path: {{ type: PathPrefix, value: /api }}, headers: [{{ name: x-canary, value: \"1\" }}] }}]
      backendRefs: [{{ name: web, port: 80, weight: 90 }}, {{ name: web2, port: 80, weight: 10 }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: cross, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  rules: [{{ backendRefs: [{{ name: api, namespace: shop, port: 80 }}] }}]
"
    );
    let services = mesh_tests::gateway::services_yaml(&[
        ("web", 80, &["127.0.63.1"], 18080, ""),
        ("web2", 80, &["127.0.63.2"], 18080, ""),
    ]);
    let gw = mesh_tests::gateway::GatewayProcess::start(
        &dir,
        &routes,
        &services,
        &["--metrics-addr", &format!("127.0.0.1:{metrics}")],
    )
    .unwrap();
    let meshctl = |extra: &[&str]| {
        Command::new(workspace_binary("meshctl").unwrap())
            .arg("routes")
            .args(extra)
            .args(["--gateway", &format!("http://127.0.0.1:{metrics}")])
            .output()
            .unwrap()
    };
    wait_for("the gateway's /routes", CONVERGE, || async {
        let out = meshctl(&[]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("default/web:80")
    })
    .await;
    let text = String::from_utf8_lossy(&meshctl(&[]).stdout).into_owned();
    for want in [
        "HTTPRoute default/canary",
        "default/gw",
        "canary.example",
        "path /api*, header x-canary=1",
        "default/web:80 w90",
        "default/web2:80 w10",
        "True/Accepted",
        "False/RefNotPermitted",
        "HTTPRoute default/cross: ResolvedRefs=False RefNotPermitted",
    ] {
        assert!(
            text.contains(want),
            "meshctl routes lacks {want:?}:\n{text}\n{}",
            gw.log_text()
        );
    }
    let json = meshctl(&["-o", "json"]);
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["source"], "file");
    assert_eq!(
        report["gateways"][0]["listeners"][0]["attached_routes"], 2,
        "{report}"
    );
}
