//! The `TrafficPolicy` CRD: the committed manifests are exactly what the Rust types generate,
//! and its CEL rules (evaluated with Kubernetes' CEL libraries, `kube`'s `cel` feature) admit the
//! objects the agent's parser accepts and refuse the ones it rejects.
//!
//! To regenerate the manifests after changing `mesh-agent/src/policy/types.rs`:
//! `KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test crd`.

use std::path::{Path, PathBuf};

use kube::core::cel::{
    AdmissionRequest, ScopeContext, Validator, VapEvaluator, VapExpression, WarningKind,
    analyze_rule, compile_schema,
};
use mesh_agent::policy::{self, crd};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (committed file, generated text)
fn manifests() -> Vec<(PathBuf, String)> {
    let crd = crd::crd_yaml().expect("CRD renders");
    let admission = crd::admission_yaml().expect("admission policy renders");
    vec![
        (
            root().join("deploy/kubernetes/trafficpolicy-crd.yaml"),
            crd.clone(),
        ),
        (
            root().join("deploy/helm/mesh/crds/trafficpolicy-crd.yaml"),
            crd,
        ),
        (
            root().join("deploy/kubernetes/trafficpolicy-admission.yaml"),
            admission.clone(),
        ),
        (
            root().join("deploy/helm/mesh/templates/trafficpolicy-admission.yaml"),
            admission,
        ),
    ]
}

#[test]
fn committed_manifests_are_generated_from_the_types() {
    let update = std::env::var_os("KERNMESH_UPDATE_MANIFESTS").is_some();
    let mut stale = Vec::new();
    for (path, generated) in manifests() {
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with mesh-agent/src/policy/types.rs: {stale:?}; regenerate with \
         KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test crd"
    );
}

#[test]
fn the_crd_has_the_agreed_names_scope_and_status() {
    let crd = crd::crd().unwrap();
    assert_eq!(
        crd["metadata"]["name"],
        "trafficpolicies.traffic.kernmesh.io"
    );
    assert_eq!(crd["spec"]["group"], "traffic.kernmesh.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "TrafficPolicy");
    assert_eq!(crd["spec"]["names"]["plural"], "trafficpolicies");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(
        v["subresources"]["status"].is_object(),
        "status subresource"
    );
    let refs = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["targetRefs"];
    assert_eq!(
        refs["maxItems"],
        policy::parse::MAX_TARGETS,
        "schema and parser agree"
    );
    assert_eq!(
        refs["items"]["properties"]["name"]["maxLength"],
        policy::parse::MAX_NAME
    );
    let text = serde_json::to_string(&crd).unwrap();
    assert!(
        text.matches("x-kubernetes-validations").count() >= 10,
        "{text}"
    );
}

fn schema() -> Value {
    crd::crd().unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn object(spec: &Value) -> Value {
    json!({
        "apiVersion": "traffic.kernmesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": "p", "namespace": "shop" },
        "spec": spec,
    })
}

/// CEL (admission) and the agent's parser must agree on every object here.
#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn cel_rules_and_the_parser_agree() {
    let schema = schema();
    let validator = Validator::new();
    let svc = json!([{ "group": "", "kind": "Service", "name": "web" }]);
    let good = [
        json!({ "targetRefs": svc }),
        json!({ "targetRefs": [{ "kind": "Namespace", "name": "shop" }, { "kind": "Service", "name": "web" }],
                "loadBalancer": { "simple": "LEAST_REQUEST" } }),
        json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 65537 } } } }),
        json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 1021 } } } }),
        json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 131_071 } } } }),
        json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": {} } } }),
        json!({ "targetRefs": svc, "connectionPool": { "maxConnections": 0 } }),
        json!({ "targetRefs": svc, "outlierDetection": {
            "consecutiveFailures": 0, "baseEjectionTime": "500ms", "maxEjectionTime": "1m30s",
            "maxEjectionPercent": 100, "healthyPanicThreshold": 0 } }),
        json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionTime": "30s" } }),
    ];
    for spec in &good {
        let obj = object(spec);
        if let Err(e) = validator.validate(&schema, &obj, None) {
            panic!("CEL refuses a good policy {spec}: {:?}", e.into_vec());
        }
        let parsed = policy::parse(&obj);
        assert!(
            parsed.outcome.is_ok(),
            "parser refuses {spec}: {:?}",
            parsed.outcome
        );
    }
    // (spec, what the CEL message says)
    let bad = [
        (
            json!({ "targetRefs": [{ "group": "apps", "kind": "Service", "name": "web" }] }),
            "group must be",
        ),
        (
            json!({ "targetRefs": [{ "kind": "Deployment", "name": "web" }] }),
            "kind must be Service or Namespace",
        ),
        (
            json!({ "targetRefs": [{ "kind": "Service", "name": "web" }, { "kind": "Service", "name": "web" }] }),
            "must not name the same target twice",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": { "simple": "FASTEST" } }),
            "simple must be",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": {} }),
            "exactly one of simple and consistentHash",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": { "simple": "RANDOM", "consistentHash": { "maglev": {} } } }),
            "exactly one of simple and consistentHash",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 1024 } } } }),
            "tableSize must be a prime",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 131_073 } } } }),
            "tableSize must be in 1021..=131071",
        ),
        (
            json!({ "targetRefs": svc, "loadBalancer": { "consistentHash": { "maglev": { "tableSize": 1019 } } } }),
            "tableSize must be in 1021..=131071",
        ),
        (
            json!({ "targetRefs": svc, "connectionPool": { "maxConnections": -1 } }),
            "maxConnections must be",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "consecutiveFailures": -1 } }),
            "consecutiveFailures must be",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionPercent": 150 } }),
            "maxEjectionPercent must be in 0..=100",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "healthyPanicThreshold": 101 } }),
            "healthyPanicThreshold must be in 0..=100",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "baseEjectionTime": "30" } }),
            "baseEjectionTime must be a duration",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "baseEjectionTime": "0s" } }),
            "baseEjectionTime must be a duration",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionTime": "1.5m" } }),
            "maxEjectionTime must be a duration",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "baseEjectionTime": "1m", "maxEjectionTime": "30s" } }),
            "maxEjectionTime must not be shorter than baseEjectionTime",
        ),
        (
            json!({ "targetRefs": svc, "outlierDetection": { "maxEjectionTime": "10s" } }),
            "maxEjectionTime must not be shorter than baseEjectionTime",
        ),
    ];
    for (spec, want) in &bad {
        let obj = object(spec);
        let errors = match validator.validate(&schema, &obj, None) {
            Ok(()) => panic!("CEL admits a bad policy {spec}"),
            Err(e) => e.into_vec(),
        };
        assert!(
            errors.iter().any(|e| e.message.contains(want)),
            "{spec}: want {want:?}, CEL said {errors:?}"
        );
        let parsed = policy::parse(&obj);
        assert!(parsed.outcome.is_err(), "parser accepts {spec}");
    }
}

#[test]
fn admission_policy_keeps_namespace_targets_in_their_namespace() {
    let [vap, binding] = crd::admission();
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    let expr = &vap["spec"]["validations"][0];
    let expressions = [VapExpression {
        expression: expr["expression"].as_str().unwrap().to_owned(),
        message: expr["message"].as_str().map(str::to_owned),
        message_expression: None,
    }];
    let eval = |targets: Value| {
        let obj = object(&json!({ "targetRefs": targets }));
        let request = AdmissionRequest {
            operation: "CREATE".to_owned(),
            name: "p".to_owned(),
            namespace: "shop".to_owned(),
            ..AdmissionRequest::default()
        };
        let evaluator = VapEvaluator::builder()
            .object(obj.clone())
            .request(request)
            .build();
        let compiled = evaluator.compile_expressions(&expressions);
        let results = evaluator.evaluate_compiled(&compiled);
        let cel = results.iter().all(|r| r.passed);
        let parser = policy::parse(&obj).outcome.is_ok();
        assert_eq!(cel, parser, "admission and parser disagree on {targets}");
        cel
    };
    assert!(eval(json!([{ "kind": "Namespace", "name": "shop" }])));
    assert!(eval(json!([{ "kind": "Service", "name": "other" }])));
    assert!(!eval(json!([{ "kind": "Namespace", "name": "other" }])));
}

/// Every rule compiles, uses only what a CRD rule may see, and stays within the API server's
/// cost budget (the prime check's 72 divisions included), as the API server checks at install.
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
                    // The analyser does not know variables bound by macros (`all(p, …)`).
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
    walk(&schema(), &mut rules, &mut problems);
    assert!(rules >= 12, "{rules} rules found");
    assert!(problems.is_empty(), "{problems:#?}");
}
