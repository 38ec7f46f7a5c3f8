//! Discovery sources: where the cluster model comes from (a static YAML file, or Kubernetes).
//! Each source sends whole models on a channel; the agent reconciles the data path to the newest.

pub mod file;
pub mod kubernetes;

use crate::model::ClusterModel;

/// What a source reports.
#[derive(Debug)]
pub enum Update {
    /// A new complete, valid model: the data path should converge to it.
    Model(ClusterModel),
    /// Input was rejected (with file/object, field and reason); the last good model stays.
    Rejected(String),
}
