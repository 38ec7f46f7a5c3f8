//! Errors of the data path, each naming the operation and the object.

use std::path::PathBuf;

/// What went wrong loading, attaching or updating the kernel data path.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("failed to load the mesh eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program `{name}` is missing from the eBPF object (built from an older mesh-ebpf?)")]
    MissingProgram { name: &'static str },
    #[error("map `{name}` is missing from the eBPF object (built from an older mesh-ebpf?)")]
    MissingMap { name: &'static str },
    #[error("failed to {op} program `{name}`: {source}")]
    Program {
        op: &'static str,
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("failed to {op} map `{name}`: {source}")]
    Map {
        op: &'static str,
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map `{name}` is full ({capacity} entries): {what} was not written")]
    MapFull {
        name: &'static str,
        capacity: u32,
        what: String,
    },
    #[error("failed to {op} `{}`: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to pin link of program `{name}` at `{}`: {source}", path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("invalid service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error("L7 report on backend {backend_id}: the kernel answered {verdict}: {reason}")]
    Report {
        backend_id: u32,
        verdict: u32,
        reason: &'static str,
    },
    #[error("cannot adopt the pinned maps: {reason}")]
    Adopt { reason: String },
    #[error("failed to set up kernel log forwarding: {0}")]
    Log(String),
    #[error(transparent)]
    Kernel(#[from] super::probe::ProbeError),
}
