//! The manifests generated from the policy types: the `TrafficPolicy` CRD (schema and CEL rules
//! from `types`) and the `ValidatingAdmissionPolicy` for the one rule a CRD's own CEL cannot
//! state. `deploy/` holds the committed copies; the test `mesh-agent/tests/crd.rs` fails when
//! they differ from this output and rewrites them under `KERNMESH_UPDATE_MANIFESTS=1`.

use kube::CustomResourceExt as _;
use serde_json::{Value, json};

use super::types::{GROUP, TrafficPolicy, VERSION};

/// Name of the admission policy and of its binding.
pub const ADMISSION_POLICY: &str = "trafficpolicies.traffic.kernmesh.io";
/// Header of every generated file.
pub const GENERATED_HEADER: &str = "# Generated from mesh-agent/src/policy/types.rs; do not edit. Regenerate with\n# KERNMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-agent --test crd\n";

/// Why the manifests could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("rendering the {what} as YAML: {source}")]
    Yaml {
        what: &'static str,
        source: serde_saphyr::ser::Error,
    },
    #[error("rendering the {what} as JSON: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// The CRD as JSON.
pub fn crd() -> Result<Value, CrdError> {
    serde_json::to_value(TrafficPolicy::crd()).map_err(|source| CrdError::Json {
        what: "CustomResourceDefinition",
        source,
    })
}

/// A CRD's CEL rules see only `metadata.name` of the object, not its namespace, so "a
/// `Namespace` target names the policy's own namespace" is checked at admission by this
/// `ValidatingAdmissionPolicy` (GA since Kubernetes 1.30) and its binding.
#[must_use]
pub fn admission() -> [Value; 2] {
    let labels = json!({
        "app.kubernetes.io/name": "mesh-agent",
        "app.kubernetes.io/part-of": "mesh",
    });
    [
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": { "name": ADMISSION_POLICY, "labels": labels },
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [{
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["trafficpolicies"],
                    }],
                },
                "validations": [{
                    "expression": NAMESPACE_TARGET_RULE,
                    "message": "a targetRef of kind Namespace must name the policy's own namespace",
                    "reason": "Invalid",
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": { "name": ADMISSION_POLICY, "labels": labels },
            "spec": {
                "policyName": ADMISSION_POLICY,
                "validationActions": ["Deny"],
            },
        }),
    ]
}

/// The admission rule: every `Namespace` target is the namespace the object is written to
/// (`request.namespace`; the object's `metadata.namespace` may be left for the server to fill).
pub const NAMESPACE_TARGET_RULE: &str =
    "object.spec.targetRefs.all(r, r.kind != 'Namespace' || r.name == request.namespace)";

fn yaml(what: &'static str, v: &Value) -> Result<String, CrdError> {
    serde_saphyr::to_string(v).map_err(|source| CrdError::Yaml { what, source })
}

/// The CRD file (`deploy/kubernetes/trafficpolicy-crd.yaml`, the chart's `crds/`).
pub fn crd_yaml() -> Result<String, CrdError> {
    Ok(format!(
        "{GENERATED_HEADER}{}",
        yaml("CustomResourceDefinition", &crd()?)?
    ))
}

/// The admission file (`deploy/kubernetes/trafficpolicy-admission.yaml`, a chart template).
pub fn admission_yaml() -> Result<String, CrdError> {
    let [policy, binding] = admission();
    Ok(format!(
        "{GENERATED_HEADER}{}---\n{}",
        yaml("ValidatingAdmissionPolicy", &policy)?,
        yaml("ValidatingAdmissionPolicyBinding", &binding)?
    ))
}
