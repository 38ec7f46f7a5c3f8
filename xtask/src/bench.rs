//! `cargo xtask bench <suite>`: install-deps, build-ebpf, the release binaries, then the suite's
//! benchmark binary (`target/release/mesh-bench`), as root (network namespaces, cgroups, eBPF).
//! Results land in `target/bench/`.

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;

use crate::ebpf::{self, Toolchain};
use crate::step::Step;
use crate::{cmd, deps, workspace};

/// A benchmark suite.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Suite {
    /// Kernel socket LB vs direct, iptables DNAT (kube-proxy) and haproxy; connect latency at
    /// 10 vs 10,000 services; same-node bypass; fail fast (`target/bench/datapath.json`).
    Datapath,
    /// The real agent reconciling 10,000 services x 10 endpoints from a static file: time, RSS,
    /// endpoint updates per second (`target/bench/control-plane.json`).
    ControlPlane,
    /// HBONE tunnel vs plaintext vs an nginx `stream` TLS pair between two nodes; the proxies'
    /// CPU per request and RSS; rustls vs kernel TLS for one stream (`target/bench/mtls.json`).
    Mtls,
    /// `mesh-agent gateway` vs nginx, `HAProxy` and direct: HTTP/1.1 keep-alive (wrk), HTTP/2
    /// over TLS and gRPC unary (h2load), the gateway's RSS (`target/bench/gateway.json`).
    Gateway,
    /// Telemetry on vs off: connection churn through the kernel with the real agent, HTTP/1.1
    /// keep-alive through the gateway; one scrape of an agent with 10,000 services
    /// (`target/bench/telemetry.json`).
    Telemetry,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Self::Datapath => "datapath",
            Self::ControlPlane => "control-plane",
            Self::Mtls => "mtls",
            Self::Gateway => "gateway",
            Self::Telemetry => "telemetry",
        }
    }
}

/// Runs install-deps, build-ebpf, builds the release binaries and runs `mesh-bench <suite>
/// [--quick]`.
pub fn run(suite: Suite, quick: bool) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "the {} benchmark needs root (network namespaces, cgroups, eBPF): run `cargo xtask bench {}` as root",
            suite.name(),
            suite.name()
        );
    }
    deps::install()?;
    ebpf::build(&Toolchain::prepare()?)?;
    // The suites run the agent, the CLI and the pods' workload tool found next to mesh-bench.
    workspace::build_release_binaries()?;
    let step = Step::loud(format!("running mesh-bench {}", suite.name()));
    let mut shown = format!("cargo xtask bench {}", suite.name());
    // The binary build_release_binaries just made: `cargo run -p mesh-tests` would build
    // mesh-agent again with another feature set (minutes) and replace the siblings' neighbour.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace::root().join("target"),
        std::path::PathBuf::from,
    );
    let mut bench = std::process::Command::new(target.join("release/mesh-bench"));
    bench.current_dir(workspace::root()).arg(suite.name());
    if quick {
        bench.arg("--quick");
        shown.push_str(" --quick");
    }
    // mesh-bench prints the command that produced its numbers.
    bench.env("MESH_BENCH_COMMAND", shown);
    cmd::run(&mut bench).context("mesh-bench failed: see its output above")?;
    step.done();
    Ok(())
}
