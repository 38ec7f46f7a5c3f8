//! Discovery sources: where the cluster model comes from (a static YAML file, or Kubernetes).
//! Each source sends whole models on a channel; the agent reconciles the data path to the newest.

pub mod file;
pub mod kubernetes;

use std::{fmt, path::PathBuf};

use crate::model::{ClusterModel, ObjectName};

/// Why a discovery source stopped (its supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("building the Kubernetes client: {0}")]
    KubernetesClient(#[source] kube::Error),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
}

impl DiscoveryError {
    /// A short, fixed name of the kind of failure (a metric label).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KubernetesClient(_) => "kubernetes_client",
            Self::Kubernetes(kubernetes::KubernetesError::ChannelClosed { .. }) => "channel_closed",
            Self::Kubernetes(kubernetes::KubernetesError::WatchEnded { .. }) => "watch_ended",
            Self::Kubernetes(kubernetes::KubernetesError::BuildCancelled { .. }) => {
                "build_cancelled"
            }
        }
    }
}

/// What a source reports.
#[derive(Debug)]
pub enum Update {
    /// A new complete, valid model: the data path should converge to it.
    Model(ClusterModel),
    /// Input was rejected (with file/object, field and reason); the last good model stays.
    Rejected(Rejection),
    /// An object rejected before is valid again (or gone): its rejections no longer apply.
    Resolved(ObjectRef),
}

/// An object a rejection is about: `Service shop/web`, `TrafficPolicy shop/p`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub name: ObjectName,
}

impl ObjectRef {
    #[must_use]
    pub fn new(kind: impl Into<String>, name: ObjectName) -> Self {
        Self {
            kind: kind.into(),
            name,
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Input a source could not use, naming the file or object, the field and the reason. Only
/// the input concerned is refused: the rest of the model (and the last good state) stays.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A static file rejected as a whole (file, line, field, reason).
    #[error("{0}")]
    File(#[from] file::ConfigError),
    /// One field of one object: a value that cannot be used (the object keeps its last good
    /// settings).
    #[error("{object}: {message}")]
    InvalidField {
        object: ObjectRef,
        field: String,
        message: String,
    },
    /// One field of one object that the source does not know (likely a typo): ignored.
    #[error("{object}: {message}")]
    UnknownField {
        object: ObjectRef,
        field: String,
        message: String,
    },
}

/// What a rejection is keyed by in status: one file, or one field of one object. A newer
/// rejection of the same key replaces the older one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectionKey {
    File(PathBuf),
    Field(ObjectRef, String),
}

impl fmt::Display for RejectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Field(o, field) => write!(f, "{o} {field}"),
        }
    }
}

impl Rejection {
    /// The file a rejection is about.
    #[must_use]
    pub fn file(error: file::ConfigError) -> Self {
        Self::File(error)
    }

    /// A short, fixed name of the kind of problem (a metric label).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "invalid_file",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownField { .. } => "unknown_field",
        }
    }

    /// What this rejection replaces and what clears it.
    #[must_use]
    pub fn key(&self) -> RejectionKey {
        match self {
            Self::File(e) => RejectionKey::File(e.file.clone()),
            Self::InvalidField { object, field, .. } | Self::UnknownField { object, field, .. } => {
                RejectionKey::Field(object.clone(), field.clone())
            }
        }
    }

    /// The object concerned (`None` for a file).
    #[must_use]
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            Self::File(_) => None,
            Self::InvalidField { object, .. } | Self::UnknownField { object, .. } => Some(object),
        }
    }
}
