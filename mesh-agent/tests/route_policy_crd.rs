//! The gateway's `RoutePolicy` CRD: the committed manifests are exactly what the Rust types
//! generate, and the CRD's schema names every field the gateway's parser reads.
//!
//! To regenerate after changing `mesh-agent/src/gateway/route_policy.rs`:
//! `KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test route_policy_crd`.

use std::path::{Path, PathBuf};

use mesh_agent::gateway::route_policy;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_manifests_are_generated_from_the_types() {
    let generated = route_policy::crd_yaml().expect("CRD renders");
    let update = std::env::var_os("KERNMESH_UPDATE_MANIFESTS").is_some();
    let mut stale = Vec::new();
    for path in [
        root().join("deploy/kubernetes/routepolicy-crd.yaml"),
        root().join("deploy/helm/mesh/crds/routepolicy-crd.yaml"),
    ] {
        if update {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        if std::fs::read_to_string(&path).unwrap_or_default() != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with mesh-agent/src/gateway/route_policy.rs: {stale:?}; regenerate with \
         KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test route_policy_crd"
    );
}

#[test]
fn the_crd_is_namespaced_under_the_gateway_group_with_the_parsers_fields() {
    use kube::CustomResourceExt as _;
    let crd = serde_json::to_value(route_policy::RoutePolicy::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "routepolicies.gateway.kernmesh.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        format!(
            "{}/{}",
            crd["spec"]["group"].as_str().unwrap(),
            crd["spec"]["versions"][0]["name"].as_str().unwrap()
        ),
        mesh_agent::gateway::config::POLICY_API_VERSION
    );
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let fields = |v: &serde_json::Value| -> Vec<String> {
        let mut f: Vec<String> = v["properties"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        f.sort();
        f
    };
    assert_eq!(fields(spec), ["jwt", "rateLimit", "retry", "targetRefs"]);
    assert_eq!(spec["required"], serde_json::json!(["targetRefs"]));
    assert_eq!(
        fields(&spec["properties"]["jwt"]),
        [
            "audiences",
            "claims",
            "issuer",
            "jwksCaFile",
            "jwksFile",
            "jwksRefresh",
            "jwksUri"
        ]
    );
    assert_eq!(
        fields(&spec["properties"]["rateLimit"]),
        ["client", "route"]
    );
}
