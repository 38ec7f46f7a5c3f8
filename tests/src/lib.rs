//! Cluster-in-a-box test harness: nodes and pods built from real network namespaces, veth pairs
//! and cgroup v2 directories, the `meshpod` workload tool, and kernel-suite accounting.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let Some(_k) = mesh_tests::kernel_test("example") else { return Ok(()) };
//! let cluster = mesh_tests::Cluster::new("example")?;
//! let a = cluster.add_node("a")?;
//! let client = cluster.add_pod(&a, "client")?;
//! let server = cluster.add_pod(&a, "server")?;
//! let addr = std::net::SocketAddr::new(server.ipv4().into(), 8080);
//! let _srv = server.serve("server", &[addr], &[])?;
//! let report = client.hit(addr, 10, &[])?;
//! assert_eq!(report.counts["server"], 10);
//! # Ok(()) }
//! ```

pub mod agent;
pub mod bench_gateway;
pub mod bench_mtls;
pub mod bench_telemetry;
pub mod cluster;
pub mod connect;
pub mod control_plane;
pub mod env;
pub mod exec;
pub mod gateway;
pub mod hbone;
mod ip;
pub mod kernel;
pub mod kmock;
pub mod meshpod;
pub mod mtls;
pub mod prom;
pub mod samples;

pub use cluster::{Cluster, NodeHandle, PodHandle};
pub use env::{cgroup2_root, ensure_bpffs, is_root, workspace_root};
pub use exec::{DEFAULT_TIMEOUT, IfaceStats, PodChild, Sandbox};
pub use kernel::{KernelTestGuard, kernel_test, monotonic_ns};
pub use meshpod::{HitReport, Percentiles, RrReport, TransferReport, meshpod_path};
