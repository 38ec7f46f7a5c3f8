//! Unit tests of the Kubernetes source's conversion, stores and model building.

use k8s_openapi::api::{
    core::v1::{
        ClientIPConfig, ObjectReference, ServicePort as K8sServicePort, SessionAffinityConfig,
    },
    discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort},
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use super::{run::api_server_cluster_ip, *};
use crate::datapath::spec::{Algorithm, CircuitSettings};

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn service(name: &str, annotations: &[(&str, &str)], ip: &str) -> K8sService {
    K8sService {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            annotations: Some(ann(annotations)),
            ..ObjectMeta::default()
        },
        spec: Some(K8sServiceSpec {
            cluster_ip: Some(ip.to_owned()),
            cluster_ips: Some(vec![ip.to_owned()]),
            ports: Some(vec![K8sServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::String("web".to_owned())),
                ..K8sServicePort::default()
            }]),
            ..K8sServiceSpec::default()
        }),
        ..K8sService::default()
    }
}

fn slice(name: &str, service: &str, ips: &[(&str, Option<bool>)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            labels: Some(ann(&[(SERVICE_NAME_LABEL, service)])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: ips
            .iter()
            .map(|(ip, ready)| K8sEndpoint {
                addresses: vec![(*ip).to_owned()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..EndpointConditions::default()
                }),
                node_name: Some("a".to_owned()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".to_owned()),
                    name: Some(format!("pod-{ip}")),
                    ..ObjectReference::default()
                }),
                ..K8sEndpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            protocol: Some("TCP".to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

fn namespace(name: &str) -> K8sNamespace {
    K8sNamespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..K8sNamespace::default()
    }
}

#[test]
fn a_service_without_policy_has_the_defaults_and_its_own_affinity() {
    assert_eq!(service_settings(None), ServiceSettings::default());
    assert_eq!(
        service_settings(None).circuit,
        CircuitSettings::default(),
        "Envoy's numbers, unlimited connections"
    );
    let mut spec = K8sServiceSpec {
        session_affinity: Some("ClientIP".to_owned()),
        ..K8sServiceSpec::default()
    };
    assert_eq!(
        service_settings(Some(&spec)).affinity_timeout,
        Some(Duration::from_hours(3)),
        "Kubernetes' default timeout"
    );
    spec.session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(60),
        }),
    });
    assert_eq!(
        service_settings(Some(&spec)).affinity_timeout,
        Some(Duration::from_mins(1))
    );
    spec.session_affinity = Some("None".to_owned());
    assert_eq!(service_settings(Some(&spec)).affinity_timeout, None);
}

#[test]
fn ips_and_ports_skip_headless_sctp_and_external_name() {
    let mut spec = service("web", &[], "None").spec.unwrap();
    assert!(cluster_ips(&spec).is_empty());
    spec.cluster_ips = Some(vec!["10.96.0.1".to_owned(), "fd00::1".to_owned()]);
    assert_eq!(cluster_ips(&spec).len(), 2);
    spec.type_ = Some("ExternalName".to_owned());
    assert!(cluster_ips(&spec).is_empty());
    spec.ports = Some(vec![
        K8sServicePort {
            name: Some("dns".to_owned()),
            port: 53,
            protocol: Some("UDP".to_owned()),
            ..K8sServicePort::default()
        },
        K8sServicePort {
            name: Some("sctp".to_owned()),
            port: 9,
            protocol: Some("SCTP".to_owned()),
            ..K8sServicePort::default()
        },
        K8sServicePort {
            name: Some("http".to_owned()),
            port: 80,
            target_port: Some(IntOrString::Int(8080)),
            ..K8sServicePort::default()
        },
    ]);
    let ports = service_ports(&spec);
    assert_eq!(
        ports,
        vec![
            ServicePort {
                name: "dns".to_owned(),
                port: 53,
                protocol: Protocol::Udp,
                target_port: None
            },
            ServicePort {
                name: "http".to_owned(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: None
            },
        ]
    );
}

#[test]
fn slices_merge_and_resolve_named_target_ports() {
    let mut state = State::new("a".to_owned());
    for e in [
        watcher::Event::Apply(namespace("default")),
        watcher::Event::InitDone,
    ] {
        state.namespaces.apply(e);
    }
    state
        .services
        .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
    state.slices.apply_slice(
        &mut state.names,
        watcher::Event::Apply(slice(
            "web-1",
            "web",
            &[("10.1.0.2", None), ("10.1.0.3", Some(false))],
        )),
    );
    state.slices.apply_slice(
        &mut state.names,
        watcher::Event::Apply(slice(
            "web-2",
            "web",
            &[("10.1.0.4", Some(true)), ("10.1.0.2", None)],
        )),
    );
    state.slices.apply_slice(
        &mut state.names,
        watcher::Event::Apply(slice("other", "db", &[("10.1.0.9", None)])),
    );
    let (m, rejections) = state.build();
    assert!(rejections.is_empty());
    let svc = &m.services[&ObjectName::new("default", "web")];
    let ips: Vec<String> = svc.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.1.0.2", "10.1.0.3", "10.1.0.4"]);
    assert_eq!(
        svc.endpoints.iter().map(|e| e.ready).collect::<Vec<_>>(),
        [true, false, true]
    );
    assert_eq!(
        svc.endpoints[0].pod,
        Some(ObjectName::new("default", "pod-10.1.0.2"))
    );
    assert_eq!(svc.endpoints[0].node.as_deref(), Some("a"));
    // A `targetRef` in another namespace keeps it.
    let mut elsewhere = slice("web-3", "web", &[("10.1.0.5", None)]);
    elsewhere.endpoints[0]
        .target_ref
        .as_mut()
        .unwrap()
        .namespace = Some("other".to_owned());
    let eps = slice_endpoints(&elsewhere, &svc.ports, None);
    assert_eq!(eps[0].pod, Some(ObjectName::new("other", "pod-10.1.0.5")));
    // Each address of an endpoint names its pod; an endpoint without a `targetRef` names none
    // (the slice keeps the names back to back).
    let mut mixed = slice(
        "web-4",
        "web",
        &[("10.1.0.6", None), ("10.1.0.7", None), ("10.1.0.8", None)],
    );
    mixed.endpoints[1].target_ref = None;
    mixed.endpoints[2].addresses.push("10.1.0.9".to_owned());
    let pods: Vec<Option<String>> = slice_endpoints(&mixed, &svc.ports, None)
        .iter()
        .map(|e| e.pod.as_ref().map(ToString::to_string))
        .collect();
    let named = |p: &str| Some(format!("default/{p}"));
    assert_eq!(
        pods,
        [
            named("pod-10.1.0.6"),
            None,
            named("pod-10.1.0.8"),
            named("pod-10.1.0.8")
        ]
    );
    assert_eq!(std::mem::size_of::<store::SliceEndpoint>(), 32);
    let specs = m.desired_specs();
    assert_eq!(specs.len(), 1);
    let backends: Vec<String> = specs[0]
        .1
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(
        backends,
        ["10.1.0.2:8080", "10.1.0.4:8080"],
        "named port resolved, not-ready left out"
    );
}

fn traffic_policy(name: &str, created: &str, spec: &serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "traffic.kernmesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": name, "namespace": "default", "creationTimestamp": created },
        "spec": spec,
    }))
    .unwrap()
}

#[test]
fn policies_apply_and_an_invalid_one_is_rejected_whole_and_reported_once() {
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    let web = ObjectName::new("default", "web");
    state
        .services
        .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
    state
        .services
        .apply_service(watcher::Event::Apply(service("db", &[], "10.96.0.21")));
    state.policies.apply(watcher::Event::Apply(traffic_policy(
        "ns",
        "2026-01-01T00:00:00Z",
        &serde_json::json!({
            "targetRefs": [{ "kind": "Namespace", "name": "default" }],
            "loadBalancer": { "simple": "LEAST_REQUEST" },
        }),
    )));
    state.policies.apply(watcher::Event::Apply(traffic_policy(
        "web",
        "2026-02-01T00:00:00Z",
        &serde_json::json!({
            "targetRefs": [{ "kind": "Service", "name": "web" }],
            "loadBalancer": { "simple": "ROUND_ROBIN" },
            "outlierDetection": { "maxEjectionPercent": 50 },
        }),
    )));
    let (m, r) = state.build();
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(m.services[&web].settings.algorithm, Algorithm::RoundRobin);
    assert_eq!(m.services[&web].settings.circuit.max_ejection_percent, 50);
    assert_eq!(
        m.services[&ObjectName::new("default", "db")]
            .settings
            .algorithm,
        Algorithm::LeastConn,
        "the namespace policy applies where no Service policy does"
    );
    assert_eq!(state.desired_status.len(), 2);
    assert!(
        state
            .desired_status
            .values()
            .all(|d| d.condition.status == "True"),
        "{:?}",
        state.desired_status
    );
    // The Service's policy turns invalid: rejected whole; web falls back to the namespace's.
    state.policies.apply(watcher::Event::Apply(traffic_policy(
        "web",
        "2026-02-01T00:00:00Z",
        &serde_json::json!({
            "targetRefs": [{ "kind": "Service", "name": "web" }],
            "loadBalancer": { "simple": "ROUND_ROBIN" },
            "outlierDetection": { "maxEjectionPercent": 150 },
        }),
    )));
    let (m, r) = state.build();
    assert_eq!(m.services[&web].settings.algorithm, Algorithm::LeastConn);
    assert_eq!(
        m.services[&web].settings.circuit,
        CircuitSettings::default(),
        "nothing of the invalid policy applies"
    );
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].to_string(),
        "TrafficPolicy default/web: spec.outlierDetection.maxEjectionPercent: 150 is not in \
         0..=100; rejected as a whole"
    );
    let d = &state.desired_status[&ObjectName::new("default", "web")];
    assert_eq!(
        (d.condition.status.as_str(), d.condition.reason.as_str()),
        ("False", "Invalid")
    );
    assert_eq!(d.reference.kind.as_deref(), Some("TrafficPolicy"));
    let (_, r) = state.build();
    assert!(r.is_empty(), "reported once while it persists");
    // A policy that is not even well-typed is rejected the same way, alone.
    state.policies.apply(watcher::Event::Apply(traffic_policy(
        "typo",
        "2026-03-01T00:00:00Z",
        &serde_json::json!({ "targetRefs": [{ "kind": "Service", "name": "db" }], "connectionPool": 5 }),
    )));
    let (m, r) = state.build();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        m.services[&ObjectName::new("default", "db")]
            .settings
            .algorithm,
        Algorithm::LeastConn
    );
}

#[test]
fn a_missing_crd_means_no_policies_not_an_outage() {
    let mut state = State::new("a".to_owned());
    let status = kube::core::Status::failure("not found", "NotFound").with_code(404);
    state.apply(Change::Policies(Box::new(Err(
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status))),
    ))));
    assert!(state.policies.ready && state.policy_crd_missing);
    let status = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
    let mut other = State::new("a".to_owned());
    other.apply(Change::Policies(Box::new(Err(
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status))),
    ))));
    assert!(
        !other.policies.ready,
        "other errors are retried, not taken as empty"
    );
}

#[test]
fn streaming_falls_back_on_a_refusal_or_a_restart_before_the_bookmark() {
    let refused = |code: u16, kind: &str| {
        let status =
            kube::core::Status::failure("resourceVersionMatch is forbidden", kind).with_code(code);
        Change::Slices(Box::new(Err(watcher::Error::WatchStartFailed(
            kube::Error::Api(Box::new(status)),
        ))))
    };
    let mut unfinished = BTreeSet::new();
    // What an API server without streaming lists answers: 422 Invalid.
    assert!(streaming_fails(&refused(422, "Invalid"), &mut unfinished));
    assert!(streaming_fails(
        &refused(400, "BadRequest"),
        &mut unfinished
    ));
    // Other errors are retried by the watch, in either mode.
    assert!(!streaming_fails(
        &refused(403, "Forbidden"),
        &mut unfinished
    ));
    assert!(!streaming_fails(&refused(404, "NotFound"), &mut unfinished));
    let pods = |e: watcher::Event<K8sPod>| Change::Pods(Box::new(Ok(e)));
    let slices = |e: watcher::Event<EndpointSlice>| Change::Slices(Box::new(Ok(e)));
    // Each watch begins once; ends with the bookmark; may begin again after (a 410 relist).
    assert!(!streaming_fails(
        &pods(watcher::Event::Init),
        &mut unfinished
    ));
    assert!(!streaming_fails(
        &slices(watcher::Event::Init),
        &mut unfinished
    ));
    assert!(!streaming_fails(
        &pods(watcher::Event::InitDone),
        &mut unfinished
    ));
    assert!(!streaming_fails(
        &pods(watcher::Event::Init),
        &mut unfinished
    ));
    // The slices' stream began again without its bookmark ever coming: no streaming here.
    assert!(streaming_fails(
        &slices(watcher::Event::Init),
        &mut unfinished
    ));
}

#[test]
fn deleted_namespace_drops_its_objects_and_pods_follow_the_node() {
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    state
        .services
        .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
    let mut pod = K8sPod {
        metadata: ObjectMeta {
            name: Some("p".to_owned()),
            namespace: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("a".to_owned()),
            ..Default::default()
        }),
        status: Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP {
                ip: "10.1.0.7".to_owned(),
            }]),
            host_ip: Some("192.168.0.1".to_owned()),
            ..Default::default()
        }),
    };
    state
        .pods
        .apply_pod("a", watcher::Event::Apply(pod.clone()));
    pod.metadata.name = Some("elsewhere".to_owned());
    pod.spec.as_mut().unwrap().node_name = Some("b".to_owned());
    pod.status.as_mut().unwrap().host_ips = Some(vec![
        k8s_openapi::api::core::v1::HostIP {
            ip: "192.168.0.2".to_owned(),
        },
        k8s_openapi::api::core::v1::HostIP {
            ip: "fd00::2".to_owned(),
        },
    ]);
    state.pods.apply_pod("a", watcher::Event::Apply(pod));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (m, _) = state.build();
    assert_eq!(m.services.len(), 1);
    // Both are in the model; only this node's is a local pod, held whole. The other node's,
    // outside the mesh, is a name by address.
    assert_eq!(m.pods.len(), 1);
    let elsewhere = ObjectName::new("default", "elsewhere");
    assert!(m.has_pod(&elsewhere) && !m.pods.contains_key(&elsewhere));
    assert_eq!(
        m.other_pods.name_at(ip("10.1.0.7")),
        Some(elsewhere.clone())
    );
    // Where each node's agent is reached: `status.hostIPs`, else `status.hostIP`.
    assert_eq!(m.nodes["a"], vec![ip("192.168.0.1")]);
    assert_eq!(m.nodes["b"], vec![ip("192.168.0.2"), ip("fd00::2")]);
    let p = &m.pods[&ObjectName::new("default", "p")];
    assert_eq!(p.service_account, "default");
    assert_eq!(p.ips, vec!["10.1.0.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(m.local_pod_ips(), p.ips);
    state
        .namespaces
        .apply(watcher::Event::Delete(namespace("default")));
    let (m, _) = state.build();
    assert!(m.services.is_empty() && m.pods.is_empty() && m.other_pods.is_empty());
}

/// A pod of node `node` in `ns` with `labels` and addresses `ips`.
fn pod_on(ns: &str, name: &str, node: &str, labels: &[(&str, &str)], ips: &[&str]) -> K8sPod {
    K8sPod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(ann(labels)),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some("sa".to_owned()),
            ..Default::default()
        }),
        status: Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ips: Some(
                ips.iter()
                    .map(|ip| k8s_openapi::api::core::v1::PodIP {
                        ip: (*ip).to_owned(),
                    })
                    .collect(),
            ),
            host_ip: Some(format!("192.168.0.{}", node.len())),
            ..Default::default()
        }),
    }
}

#[test]
fn other_pods_table_is_shared_with_the_model_and_follows_events() {
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    let mode = crate::authz::DATAPLANE_MODE_LABEL;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let name = |n: &str| ObjectName::new("default", n);
    state.pods.apply_pod("a", watcher::Event::Init);
    for (n, addr) in [("p1", "10.2.0.1"), ("p2", "10.2.0.2"), ("p1", "10.2.0.9")] {
        // p1 listed twice: its last listing counts.
        state.pods.apply_pod(
            "a",
            watcher::Event::InitApply(pod_on("default", n, "b", &[], &[addr])),
        );
    }
    state.pods.apply_pod("a", watcher::Event::InitDone);
    let (m, _) = state.build();
    assert!(
        Arc::ptr_eq(&m.other_pods, &state.pods.others.pods),
        "shared"
    );
    assert_eq!(m.other_pods.len(), 2);
    assert_eq!(m.other_pods.name_at(ip("10.2.0.9")), Some(name("p1")));
    assert_eq!(m.other_pods.name_at(ip("10.2.0.1")), None);

    // p2 labelled into the mesh (whole), p3 added, p1 deleted: merged at the next build.
    state.pods.apply_pod(
        "a",
        watcher::Event::Apply(pod_on(
            "default",
            "p2",
            "b",
            &[(mode, "mesh")],
            &["10.2.0.2"],
        )),
    );
    state.pods.apply_pod(
        "a",
        watcher::Event::Apply(pod_on("default", "p3", "b", &[], &["10.2.0.3"])),
    );
    state.pods.apply_pod(
        "a",
        watcher::Event::Delete(pod_on("default", "p1", "b", &[], &[])),
    );
    let (m, _) = state.build();
    assert!(Arc::ptr_eq(&m.other_pods, &state.pods.others.pods));
    let others: Vec<(&str, &str)> = m.other_pods.names().collect();
    assert_eq!(others, [("default", "p3")]);
    assert!(m.pods.contains_key(&name("p2")));
    assert!(!m.has_pod(&name("p1")));

    // Back out of the mesh: an other pod again, no longer whole.
    state.pods.apply_pod(
        "a",
        watcher::Event::Apply(pod_on("default", "p2", "b", &[], &["10.2.0.2"])),
    );
    let (m, _) = state.build();
    assert!(!m.pods.contains_key(&name("p2")));
    assert_eq!(m.other_pods.name_at(ip("10.2.0.2")), Some(name("p2")));
    assert_eq!(state.pods.len(), 2);
}

#[test]
fn other_nodes_pods_are_names_by_address_until_the_mesh_concerns_them() {
    let mut state = State::new("a".to_owned());
    for ns in ["default", "shop"] {
        state.namespaces.apply(watcher::Event::Apply(namespace(ns)));
    }
    let mode = crate::authz::DATAPLANE_MODE_LABEL;
    for p in [
        pod_on("default", "plain", "b", &[], &["10.2.0.1", "fd00::1"]),
        pod_on("default", "labelled", "b", &[(mode, "mesh")], &["10.2.0.2"]),
        pod_on("shop", "in-mesh-ns", "bb", &[], &["10.2.0.3"]),
        pod_on("default", "mine", "a", &[], &["10.1.0.1"]),
    ] {
        state.pods.apply_pod("a", watcher::Event::Apply(p));
    }
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let name = |ns: &str, n: &str| ObjectName::new(ns, n);
    let (m, _) = state.build();
    let whole: Vec<&ObjectName> = m.pods.keys().collect();
    assert_eq!(
        whole,
        [&name("default", "labelled"), &name("default", "mine")],
        "this node's and labelled ones whole"
    );
    assert_eq!(m.other_pods.len(), 2);
    for addr in ["10.2.0.1", "fd00::1"] {
        assert_eq!(
            m.other_pods.name_at(ip(addr)),
            Some(name("default", "plain"))
        );
    }
    assert_eq!(
        m.other_pods.name_at(ip("10.2.0.3")),
        Some(name("shop", "in-mesh-ns"))
    );
    assert_eq!(m.other_pods.name_at(ip("10.2.0.9")), None);
    assert!(m.has_pod(&name("shop", "in-mesh-ns")) && !m.has_pod(&name("shop", "plain")));
    // Node addresses come from every pod, compact ones included.
    assert_eq!(m.nodes["b"], [ip("192.168.0.1")]);
    assert_eq!(m.nodes["bb"], [ip("192.168.0.2")]);

    // Its namespace joins the mesh: the pod is made whole (identity, tunnel destination).
    let mut shop = namespace("shop");
    shop.metadata.labels = Some(ann(&[(mode, "mesh")]));
    state.namespaces.apply(watcher::Event::Apply(shop));
    let (m, _) = state.build();
    let p = &m.pods[&name("shop", "in-mesh-ns")];
    assert_eq!(
        (
            p.node.as_str(),
            p.service_account.as_str(),
            p.ips.as_slice()
        ),
        ("bb", "sa", [ip("10.2.0.3")].as_slice())
    );
    assert_eq!(m.other_pods.len(), 1);
    let view = crate::authz::MeshView::build(&m, &m.mesh.settings);
    assert!(view.enrolled.contains_key(&name("shop", "in-mesh-ns")));

    // A pod that finished leaves; so does a deleted one.
    let mut done = pod_on("default", "plain", "b", &[], &["10.2.0.1"]);
    done.status.as_mut().unwrap().phase = Some("Succeeded".to_owned());
    state.pods.apply_pod("a", watcher::Event::Apply(done));
    state.pods.apply_pod(
        "a",
        watcher::Event::Delete(pod_on("default", "labelled", "b", &[], &[])),
    );
    let (m, _) = state.build();
    assert!(!m.has_pod(&name("default", "plain")));
    assert!(!m.has_pod(&name("default", "labelled")));
    assert!(m.other_pods.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_is_retried_not_fatal() {
    // Nothing listens on port 1: every watch fails and backs off; no model goes out.
    let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(run(client, "a".to_owned(), tx));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished(), "run keeps retrying");
    assert!(rx.try_recv().is_err(), "no model from an API never listed");
    drop(rx);
    task.abort();
}

#[test]
fn relist_replaces_the_store_only_when_complete() {
    let mut store = Store::<K8sNamespace>::new();
    store.apply(watcher::Event::Apply(namespace("old")));
    store.apply(watcher::Event::Init);
    store.apply(watcher::Event::InitApply(namespace("new")));
    assert!(
        store.objects.contains_key(&ObjectName::new("", "old")),
        "old contents visible during relist"
    );
    assert!(!store.ready);
    store.apply(watcher::Event::InitDone);
    assert!(store.ready);
    assert_eq!(
        store.objects.keys().cloned().collect::<Vec<_>>(),
        [ObjectName::new("", "new")]
    );
}

fn port(name: &str, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.to_owned(),
        port: 80,
        protocol,
        target_port: None,
    }
}

fn one_endpoint_slice(endpoint: &serde_json::Value, ports: &serde_json::Value) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": "s", "namespace": "default" },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": [endpoint],
    }))
    .unwrap()
}

#[test]
fn an_endpoint_serves_only_the_ports_its_slice_lists_by_name_and_protocol() {
    let s = one_endpoint_slice(
        &serde_json::json!({ "addresses": ["10.1.0.2"] }),
        &serde_json::json!([
            { "name": "http", "port": 8080, "protocol": "TCP" },
            { "name": "dns", "port": 5353, "protocol": "TCP" },
            { "name": "extra", "port": 9000 },
        ]),
    );
    let ports = [port("http", Protocol::Tcp), port("dns", Protocol::Udp)];
    let eps = slice_endpoints(&s, &ports, None);
    assert_eq!(eps.len(), 1);
    // dns is UDP on the service but TCP in the slice; extra is not a service port.
    assert_eq!(
        eps[0].ports,
        Arc::new(BTreeMap::from([("http".to_owned(), 8080)])),
        "{eps:?}"
    );
    assert_eq!(eps[0].port_for(&ports[0]), Some(8080));
    assert_eq!(
        eps[0].port_for(&ports[1]),
        None,
        "no fallback to any number"
    );
    // Conditions absent: ready and serving, not terminating (kube-proxy's reading).
    assert!(eps[0].ready && eps[0].serving && !eps[0].terminating);
}

#[test]
fn conditions_and_hints_are_read_and_prefer_close_hints_own_zones() {
    let ports = [port("", Protocol::Tcp)];
    let listed = serde_json::json!([{ "port": 80 }]);
    let s = one_endpoint_slice(
        &serde_json::json!({
            "addresses": ["10.1.0.2"], "zone": "z1", "nodeName": "n1",
            "conditions": { "ready": false, "serving": true, "terminating": true },
            "hints": { "forZones": [{ "name": "z2" }], "forNodes": [{ "name": "n2" }] },
        }),
        &listed,
    );
    let e = &slice_endpoints(&s, &ports, Some("PreferClose"))[0];
    assert!(!e.ready && e.serving && e.terminating);
    assert_eq!(
        (e.hints.zones.clone(), e.hints.nodes.clone()),
        (
            BTreeSet::from(["z2".to_owned()]),
            BTreeSet::from(["n2".to_owned()])
        ),
        "hints written by the controller win"
    );
    let bare = one_endpoint_slice(
        &serde_json::json!({ "addresses": ["10.1.0.3"], "zone": "z1", "nodeName": "n1" }),
        &listed,
    );
    assert_eq!(
        slice_endpoints(&bare, &ports, None)[0].hints,
        model::Hints::default()
    );
    let e = &slice_endpoints(&bare, &ports, Some("PreferClose"))[0];
    assert_eq!(e.hints.zones, BTreeSet::from(["z1".to_owned()]));
    assert!(e.hints.nodes.is_empty());
    let e = &slice_endpoints(&bare, &ports, Some("PreferSameNode"))[0];
    assert_eq!(e.hints.nodes, BTreeSet::from(["n1".to_owned()]));
    assert_eq!(e.hints.zones, BTreeSet::from(["z1".to_owned()]));
}

#[test]
fn merge_keeps_the_most_usable_copy() {
    let ports = [port("", Protocol::Tcp)];
    let listed = serde_json::json!([{ "port": 80 }]);
    let terminating = one_endpoint_slice(
        &serde_json::json!({ "addresses": ["10.1.0.2"],
            "conditions": { "ready": false, "serving": true, "terminating": true } }),
        &listed,
    );
    let gone = one_endpoint_slice(
        &serde_json::json!({ "addresses": ["10.1.0.2"],
            "conditions": { "ready": false, "serving": false, "terminating": true } }),
        &listed,
    );
    let merged = merge_endpoints(
        slice_endpoints(&gone, &ports, None)
            .into_iter()
            .chain(slice_endpoints(&terminating, &ports, None)),
    );
    assert_eq!(merged.len(), 1);
    assert!(merged[0].serving);
}

#[test]
fn lean_parsing_keeps_what_the_model_reads_and_drops_the_rest() {
    let fat = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "p", "namespace": "default", "uid": "u1",
            "labels": { "app": "x" },
            "annotations": { "big": "x".repeat(10_000) },
            "managedFields": [{ "manager": "kubectl", "operation": "Apply" }] },
        "spec": { "nodeName": "a", "hostNetwork": true, "serviceAccountName": "sa",
            "containers": [{ "name": "c", "image": "i" }] },
        "status": { "phase": "Running", "podIPs": [{ "ip": "192.168.0.1" }],
            "conditions": [{ "type": "Ready", "status": "True" }] },
    });
    let full: K8sPod = serde_json::from_value(fat.clone()).unwrap();
    let lean: lean::LeanPod = serde_json::from_value(fat).unwrap();
    let pod = lean.into_full();
    assert_eq!(pod_of(&pod), pod_of(&full));
    assert!(pod_of(&pod).unwrap().host_network);
    assert!(pod.metadata.managed_fields.is_none() && pod.metadata.annotations.is_none());
    assert!(pod.spec.as_ref().unwrap().containers.is_empty());
    assert!(pod.status.as_ref().unwrap().conditions.is_none());

    let mut fat = serde_json::to_value(service(
        "web",
        &[("kubectl.kubernetes.io/last-applied-configuration", "{}")],
        "10.96.0.20",
    ))
    .unwrap();
    fat["spec"]["sessionAffinity"] = serde_json::json!("ClientIP");
    fat["metadata"]["managedFields"] = serde_json::json!([{ "manager": "m" }]);
    fat["status"] = serde_json::json!({ "loadBalancer": {} });
    let full: K8sService = serde_json::from_value(fat.clone()).unwrap();
    let svc = serde_json::from_value::<lean::LeanService>(fat)
        .unwrap()
        .into_full();
    assert_eq!(
        service_settings(svc.spec.as_ref()),
        service_settings(full.spec.as_ref())
    );
    assert_eq!(
        service_settings(svc.spec.as_ref()).affinity_timeout,
        Some(DEFAULT_AFFINITY_TIMEOUT)
    );
    assert!(
        svc.metadata.annotations.is_none(),
        "no annotations kept: settings come only from TrafficPolicy"
    );
    assert!(svc.metadata.managed_fields.is_none() && svc.status.is_none());
    assert_eq!(svc.spec, full.spec);

    let fat = serde_json::to_value(slice("s", "web", &[("10.1.0.2", Some(false))])).unwrap();
    let full: EndpointSlice = serde_json::from_value(fat.clone()).unwrap();
    let lean = serde_json::from_value::<lean::LeanSlice>(fat)
        .unwrap()
        .into_full();
    assert_eq!(
        StoredSlice::new(&lean, &mut Names::default()),
        StoredSlice::new(&full, &mut Names::default())
    );

    let node = serde_json::from_value::<lean::LeanNode>(serde_json::json!({
        "metadata": { "name": "a", "labels": { ZONE_LABEL: "z1", "kubernetes.io/os": "linux" } },
        "status": { "images": [{ "names": ["x"] }] },
    }))
    .unwrap()
    .into_full();
    assert_eq!(node.labels().len(), 1);
    assert!(node.status.is_none());
    let ns = serde_json::from_value::<lean::LeanNamespace>(serde_json::json!({
        "metadata": { "name": "x", "deletionTimestamp": "2026-11-29T10:00:00Z" },
        "status": { "phase": "Terminating" },
    }))
    .unwrap()
    .into_full();
    assert!(ns.metadata.deletion_timestamp.is_some());
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
}

#[test]
fn an_api_server_behind_a_programmed_cluster_ip_is_noticed() {
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    state.services.apply_service(watcher::Event::Apply(service(
        "kubernetes",
        &[],
        "10.96.0.1",
    )));
    let (m, _) = state.build();
    assert_eq!(
        api_server_cluster_ip(Some("10.96.0.1"), &m),
        Some("10.96.0.1".parse().unwrap())
    );
    assert_eq!(api_server_cluster_ip(Some("192.168.1.10"), &m), None);
    assert_eq!(api_server_cluster_ip(Some("api.example.com"), &m), None);
    assert_eq!(api_server_cluster_ip(None, &m), None);
}

#[test]
fn the_zone_comes_from_this_nodes_object_and_policy_from_the_spec() {
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    let node = |name: &str, zone: &str| -> K8sNode {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { ZONE_LABEL: zone } },
        }))
        .unwrap()
    };
    state.nodes.apply(watcher::Event::Apply(node("b", "z2")));
    assert_eq!(
        state.build().0.node_zone,
        None,
        "another node's zone is not ours"
    );
    state.nodes.apply(watcher::Event::Apply(node("a", "z1")));
    assert_eq!(state.build().0.node_zone.as_deref(), Some("z1"));
    let mut svc = service("web", &[], "10.96.0.20");
    svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".to_owned());
    state.services.apply_service(watcher::Event::Apply(svc));
    let (m, _) = state.build();
    assert_eq!(
        m.services[&ObjectName::new("default", "web")].internal_traffic_policy,
        model::TrafficPolicy::Local
    );
}

fn security_object(kind: &str, name: &str, spec: &serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "security.kernmesh.io/v1alpha1",
        "kind": kind,
        "metadata": { "name": name, "namespace": "default" },
        "spec": spec,
    }))
    .unwrap()
}

#[test]
fn enrollment_labels_and_security_objects_reach_the_model_and_the_last_good_stays() {
    let mut state = State::new("a".to_owned());
    let mut ns = namespace("default");
    ns.metadata.labels = Some(ann(&[(crate::authz::DATAPLANE_MODE_LABEL, "mesh")]));
    state.namespaces.apply(watcher::Event::Apply(ns));
    let mut legacy = service("legacy", &[], "10.96.0.30");
    legacy.metadata.labels = Some(ann(&[(crate::authz::DATAPLANE_MODE_LABEL, "none")]));
    state.services.apply_service(watcher::Event::Apply(legacy));
    state
        .services
        .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.31")));
    let deny = serde_json::json!({
        "action": "DENY",
        "rules": [{ "from": [{ "source": { "namespaces": ["other"] } }] }],
    });
    state
        .authz_policies
        .apply(watcher::Event::Apply(security_object(
            "AuthorizationPolicy",
            "deny-other",
            &deny,
        )));
    state
        .peer_authns
        .apply(watcher::Event::Apply(security_object(
            "PeerAuthentication",
            "default",
            &serde_json::json!({ "mtls": { "mode": "STRICT" } }),
        )));
    let (mut m, _) = state.build();
    let (rejected, resolved) = state.security(&mut m);
    assert!(rejected.is_empty() && resolved.is_empty(), "{rejected:?}");
    assert_eq!(
        m.mesh.namespace_modes.get("default"),
        Some(&crate::authz::DataplaneMode::Mesh)
    );
    assert!(
        m.mesh
            .opted_out_services
            .contains(&ObjectName::new("default", "legacy"))
    );
    assert!(
        !m.mesh
            .opted_out_services
            .contains(&ObjectName::new("default", "web"))
    );
    assert_eq!(m.mesh.authorization.len(), 1);
    assert_eq!(m.mesh.peer_authentication.len(), 1);

    // An edit adds an L7 field: rejected (once) with object, field and reason, and the
    // last valid version keeps applying.
    let mut bad = deny.clone();
    bad["rules"][0]["to"] = serde_json::json!([{ "operation": { "methods": ["GET"] } }]);
    state
        .authz_policies
        .apply(watcher::Event::Apply(security_object(
            "AuthorizationPolicy",
            "deny-other",
            &bad,
        )));
    let (mut m, _) = state.build();
    let (rejected, _) = state.security(&mut m);
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        rejected[0].to_string(),
        "AuthorizationPolicy default/deny-other: spec.rules[0].to[0].operation.methods: L7 fields are not supported by this L4 \
         policy (Istio ambient needs a waypoint proxy for them); rejected as a whole"
    );
    assert!(m.mesh.authorization[0].superseded_by.is_some());
    let kept = m.mesh.authorization[0].outcome.as_ref().unwrap();
    assert_eq!(
        kept.action,
        crate::authz::Action::Deny,
        "the last good DENY still applies"
    );
    let (mut m, _) = state.build();
    assert!(state.security(&mut m).0.is_empty(), "reported once");
    // Fixed: the rejection is resolved.
    state
        .authz_policies
        .apply(watcher::Event::Apply(security_object(
            "AuthorizationPolicy",
            "deny-other",
            &deny,
        )));
    let (mut m, _) = state.build();
    let (_, resolved) = state.security(&mut m);
    assert_eq!(
        resolved,
        vec![(
            "AuthorizationPolicy",
            ObjectName::new("default", "deny-other")
        )]
    );
}

/// Heap bytes in use (glibc's count over every arena; the test binary runs on glibc malloc).
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.uordblks
}

/// What the source, the model and the snapshot hold for the control-plane benchmark's cluster
/// (10,000 services × 10 endpoints, 100,000 pods on 100 nodes, 1 % on this node), per step.
/// A measurement, not a check: `cargo test -p mesh-agent --lib -- --ignored --nocapture
/// heap_of_the_benchmark_cluster`.
#[test]
#[ignore = "measurement; run by hand"]
#[expect(
    clippy::too_many_lines,
    clippy::cast_precision_loss,
    reason = "one measurement, step by step, printed in MB"
)]
fn heap_of_the_benchmark_cluster() {
    let (services, endpoints) = (10_000, 10);
    let node_of = |s: usize, e: usize| match (s * 10 + e) % 100 {
        0 => "a".to_owned(),
        n => format!("n{n}"),
    };
    let mut state = State::new("a".to_owned());
    state
        .namespaces
        .apply(watcher::Event::Apply(namespace("default")));
    let start = heap_in_use();
    let step = |what: &str, since: &mut usize| {
        let now = heap_in_use();
        let delta = now as f64 - *since as f64;
        eprintln!(
            "{what}: {:.1} MB ({:.0} B per pod)",
            delta / 1e6,
            delta / (services * endpoints) as f64
        );
        *since = now;
    };
    let mut at = start;
    state.pods.apply_pod("a", watcher::Event::Init);
    for s in 0..services {
        for e in 0..endpoints {
            let ip = format!("10.{}.{}.{}", 100 + s / 250 % 100, s % 250, e + 1);
            let pod = K8sPod {
                metadata: ObjectMeta {
                    name: Some(format!("svc-{s}-{e}")),
                    namespace: Some("default".to_owned()),
                    labels: Some(ann(&[("app", &format!("svc-{s}"))])),
                    uid: Some(format!("00000000-0000-0000-{s:04}-{e:012}")),
                    ..ObjectMeta::default()
                },
                spec: Some(k8s_openapi::api::core::v1::PodSpec {
                    node_name: Some(node_of(s, e)),
                    service_account_name: Some("default".to_owned()),
                    ..Default::default()
                }),
                status: Some(k8s_openapi::api::core::v1::PodStatus {
                    phase: Some("Running".to_owned()),
                    pod_ip: Some(ip.clone()),
                    pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP { ip }]),
                    host_ip: Some(format!("192.168.1.{}", (s * 10 + e) % 100)),
                    ..Default::default()
                }),
            };
            state.pods.apply_pod("a", watcher::Event::InitApply(pod));
        }
    }
    state.pods.apply_pod("a", watcher::Event::InitDone);
    step("pod store", &mut at);
    state.services.apply_service(watcher::Event::Init);
    for s in 0..services {
        let (hi, lo) = (s / 250, s % 250 + 1);
        state
            .services
            .apply_service(watcher::Event::InitApply(service(
                &format!("svc-{s}"),
                &[],
                &format!("10.96.{hi}.{lo}"),
            )));
    }
    state.services.apply_service(watcher::Event::InitDone);
    step("service store", &mut at);
    state
        .slices
        .apply_slice(&mut state.names, watcher::Event::Init);
    for s in 0..services {
        let name = format!("svc-{s}");
        let ips: Vec<String> = (0..endpoints)
            .map(|e| format!("10.{}.{}.{}", 100 + s / 250 % 100, s % 250, e + 1))
            .collect();
        let listed: Vec<(&str, Option<bool>)> =
            ips.iter().map(|ip| (ip.as_str(), Some(true))).collect();
        let mut sl = slice(&format!("{name}-x1"), &name, &listed);
        for (e, ep) in sl.endpoints.iter_mut().enumerate() {
            ep.node_name = Some(node_of(s, e));
            ep.zone = Some("z1".to_owned());
            ep.target_ref.as_mut().unwrap().name = Some(format!("{name}-{e}"));
        }
        state
            .slices
            .apply_slice(&mut state.names, watcher::Event::InitApply(sl));
    }
    state
        .slices
        .apply_slice(&mut state.names, watcher::Event::InitDone);
    step("slice store", &mut at);
    let (model, _) = state.build();
    step("model", &mut at);
    let snapshot =
        crate::state::Snapshot::build(1, model, crate::reconcile::AppliedServices::new());
    step(
        "snapshot (model without endpoints, indexes, mesh view)",
        &mut at,
    );
    eprintln!(
        "total {:.1} MB",
        (heap_in_use() as f64 - start as f64) / 1e6
    );
    assert_eq!(snapshot.model.services.len(), services);
}
