//! The traffic policy API: the `TrafficPolicy` custom resource (`traffic.kernmesh.io/v1alpha1`),
//! its one parser/validator shared by every discovery source, how policies resolve onto
//! Services, and the elected writer of their status.

pub mod crd;
pub mod parse;
pub mod resolve;
pub mod status;
pub mod types;

pub use parse::{ParsedPolicy, PolicyError, PolicySettings, Target, TargetKind, parse};
pub use resolve::{Reason, Report, Resolution, resolve};
pub use types::{TrafficPolicy, TrafficPolicySpec, TrafficPolicyStatus};
