//! The `AuthorizationPolicy` and `PeerAuthentication` CRDs: the committed manifests are exactly
//! what `mesh-agent/src/authz/types.rs` generates, and their CEL rules (evaluated with
//! Kubernetes' CEL libraries) admit what the agent's parser accepts and refuse what it rejects —
//! L7 fields included, which the structural schema would otherwise prune silently.
//!
//! Regenerate after changing the types:
//! `KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test authz_crd`.

use std::path::{Path, PathBuf};

use kube::core::cel::{ScopeContext, Validator, WarningKind, analyze_rule, compile_schema};
use mesh_agent::authz::{self, crd};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_manifests_are_generated_from_the_types() {
    let text = crd::crds_yaml().expect("CRDs render");
    let update = std::env::var_os("KERNMESH_UPDATE_MANIFESTS").is_some();
    let mut stale = Vec::new();
    for path in [
        root().join("deploy/kubernetes/security-crds.yaml"),
        root().join("deploy/helm/mesh/crds/security-crds.yaml"),
    ] {
        if update {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).unwrap_or_default() != text {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with mesh-agent/src/authz/types.rs: {stale:?}; regenerate with \
         KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test authz_crd"
    );
}

#[test]
fn the_crds_have_the_agreed_names() {
    for (crd, plural, kind) in [
        (
            crd::authorization_crd().unwrap(),
            "authorizationpolicies",
            "AuthorizationPolicy",
        ),
        (
            crd::peer_authentication_crd().unwrap(),
            "peerauthentications",
            "PeerAuthentication",
        ),
    ] {
        assert_eq!(
            crd["metadata"]["name"],
            format!("{plural}.security.kernmesh.io")
        );
        assert_eq!(crd["spec"]["group"], "security.kernmesh.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], kind);
        assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
        assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
    }
}

fn schema(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn object(kind: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "security.kernmesh.io/v1alpha1",
        "kind": kind,
        "metadata": { "name": "p", "namespace": "shop" },
        "spec": spec,
    })
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn cel_rules_and_the_parser_agree() {
    let validator = Validator::new();
    let az = schema(&crd::authorization_crd().unwrap());
    let pa = schema(&crd::peer_authentication_crd().unwrap());
    let good_az = [
        json!({}),
        json!({ "rules": [{}] }),
        json!({ "action": "DENY", "selector": { "matchLabels": { "app": "db" } },
                "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/a/sa/b", "*"],
                                                    "notNamespaces": ["x*"] } }],
                            "to": [{ "operation": { "ports": ["8080"], "notPorts": ["65535"] } }] }] }),
    ];
    for spec in &good_az {
        let obj = object("AuthorizationPolicy", spec);
        if let Err(e) = validator.validate(&az, &obj, None) {
            panic!("CEL refuses a good policy {spec}: {:?}", e.into_vec());
        }
        assert!(authz::parse_authorization(&obj).outcome.is_ok(), "{spec}");
    }
    let bad_az = [
        (json!({ "action": "AUDIT" }), "action must be ALLOW or DENY"),
        (json!({ "action": "allow" }), "action must be ALLOW or DENY"),
        (
            json!({ "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] }),
            "L7 fields are not supported",
        ),
        (
            json!({ "rules": [{ "to": [{ "operation": { "paths": ["/x"] } }] }] }),
            "L7 fields are not supported",
        ),
        (
            json!({ "rules": [{ "from": [{ "source": { "requestPrincipals": ["*"] } }] }] }),
            "L7 fields are not supported",
        ),
        (
            json!({ "rules": [{ "when": [{ "key": "request.headers[x]", "values": ["y"] }] }] }),
            "conditions are not supported",
        ),
        (
            json!({ "rules": [{ "from": [{ "source": { "principals": [""] } }] }] }),
            "principals must be non-empty",
        ),
        (
            json!({ "rules": [{ "to": [{ "operation": { "ports": ["0"] } }] }] }),
            "ports must be port numbers",
        ),
        (
            json!({ "rules": [{ "to": [{ "operation": { "ports": ["70000"] } }] }] }),
            "ports must be port numbers",
        ),
        (
            json!({ "rules": [{ "to": [{ "operation": { "notPorts": ["http"] } }] }] }),
            "notPorts must be port numbers",
        ),
        (
            json!({ "rules": [{ "from": [{ "source": { "ipBlocks": ["10.0.0.0/8"] } }] }] }),
            "ipBlocks are not supported",
        ),
    ];
    for (spec, want) in &bad_az {
        let obj = object("AuthorizationPolicy", spec);
        let errors = match validator.validate(&az, &obj, None) {
            Ok(()) => panic!("CEL admits a bad policy {spec}"),
            Err(e) => e.into_vec(),
        };
        assert!(
            errors.iter().any(|e| e.message.contains(want)),
            "{spec}: want {want:?}, CEL said {errors:?}"
        );
        assert!(
            authz::parse_authorization(&obj).outcome.is_err(),
            "parser accepts {spec}"
        );
    }
    for mode in ["STRICT", "PERMISSIVE", "UNSET"] {
        let obj = object("PeerAuthentication", &json!({ "mtls": { "mode": mode } }));
        assert!(validator.validate(&pa, &obj, None).is_ok(), "{mode}");
        assert!(
            authz::parse_peer_authentication(&obj).outcome.is_ok(),
            "{mode}"
        );
    }
    for (spec, want) in [
        (
            json!({ "mtls": { "mode": "DISABLE" } }),
            "mode must be STRICT, PERMISSIVE or UNSET",
        ),
        (
            json!({ "mtls": { "mode": "strict" } }),
            "mode must be STRICT, PERMISSIVE or UNSET",
        ),
        (
            json!({ "portLevelMtls": { "80": { "mode": "STRICT" } } }),
            "portLevelMtls is not supported",
        ),
    ] {
        let obj = object("PeerAuthentication", &spec);
        let errors = match validator.validate(&pa, &obj, None) {
            Ok(()) => panic!("CEL admits {spec}"),
            Err(e) => e.into_vec(),
        };
        assert!(
            errors.iter().any(|e| e.message.contains(want)),
            "{spec}: {errors:?}"
        );
        assert!(
            authz::parse_peer_authentication(&obj).outcome.is_err(),
            "parser accepts {spec}"
        );
    }
}

/// Every rule compiles, uses only what a CRD rule may see, and stays within the API server's
/// cost budget (every list and string is bounded).
#[test]
fn every_rule_is_in_scope_and_within_the_cost_budget() {
    fn walk(node: &Value, rules: &mut usize, problems: &mut Vec<String>) {
        if let Some(list) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            let compiled = compile_schema(node);
            for r in list {
                let rule = r["rule"].as_str().expect("rule text");
                *rules += 1;
                for w in analyze_rule(rule, &compiled, ScopeContext::CrdValidation) {
                    let bound = w
                        .message
                        .split('\'')
                        .nth(1)
                        .is_some_and(|v| rule.contains(&format!("({v}, ")));
                    if !(w.kind == WarningKind::WrongScope && bound) {
                        problems.push(format!("{rule}: {w:?}"));
                    }
                }
                if kube::core::cel::cel::Program::compile(rule).is_err() {
                    problems.push(format!("{rule}: does not compile"));
                }
            }
        }
        match node {
            Value::Object(map) => map.values().for_each(|v| walk(v, rules, problems)),
            Value::Array(list) => list.iter().for_each(|v| walk(v, rules, problems)),
            _ => {}
        }
    }
    let mut rules = 0;
    let mut problems = Vec::new();
    walk(
        &schema(&crd::authorization_crd().unwrap()),
        &mut rules,
        &mut problems,
    );
    walk(
        &schema(&crd::peer_authentication_crd().unwrap()),
        &mut rules,
        &mut problems,
    );
    assert!(rules >= 10, "{rules} rules found");
    assert!(problems.is_empty(), "{problems:#?}");
}
