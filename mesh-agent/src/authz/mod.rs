//! Enrollment, peer authentication and L4 authorization policy (issue 9): the
//! `security.kernmesh.io/v1alpha1` API, its one parser, the per-workload mesh view and the
//! engine the inbound proxy and the kernel's same-node verdicts use.

pub mod crd;
pub mod engine;
pub mod mesh;
pub mod parse;
pub mod types;

pub use engine::{
    ANY_PORT, AuthzIndex, Decision, DecisionReason, Denial, EnforcementPoint, KernelKey, Peer,
    UNAUTHENTICATED, WorkloadPolicies, evaluate, evaluate_peer, kernel_entries, kernel_lookup,
};
pub use mesh::{
    DATAPLANE_MODE_LABEL, DataplaneMode, MeshInputs, MeshSettings, MeshView, ModeSource,
    NotEnrolled, PodMesh,
};
pub use parse::{
    Action, MtlsMode, ObjectError, ParsedAuthz, ParsedPeerAuthn, parse_authorization,
    parse_peer_authentication,
};
