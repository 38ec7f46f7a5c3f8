//! `mesh-agent`: the per-node daemon (a `DaemonSet` in Kubernetes).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_agent::{
    app::{self, AgentConfig, Source},
    logging, sys,
};

/// The mesh's node agent: attaches the kernel data path and keeps it in step with the cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This node's name (Kubernetes: from the downward API, `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Read the cluster model from this YAML file (reloaded on change).
    #[arg(long, conflicts_with = "kubernetes")]
    config_file: Option<PathBuf>,
    /// Read the cluster model from the Kubernetes API (in-cluster config or kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// cgroup v2 directory to attach to (default: the cgroup2 mount root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = app::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Admin API socket (gRPC, mode 0600).
    #[arg(long, default_value = app::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// Readiness endpoint (`GET /healthz/ready`); `none` to disable.
    #[arg(long, default_value = app::DEFAULT_READINESS_ADDR)]
    readiness_addr: String,
    /// Prometheus metrics endpoint (served with the telemetry stage); `none` to disable.
    #[arg(long, default_value = "none")]
    metrics_addr: String,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value == "none" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("--{flag} {value:?} is not an address:port (or `none`)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_json);
    let source = match (args.config_file, args.kubernetes) {
        (Some(f), false) => Source::File(f),
        (None, true) => Source::Kubernetes,
        _ => bail!("choose where the cluster model comes from: --config-file FILE or --kubernetes"),
    };
    let node = match args.node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname")?
            .trim()
            .to_owned(),
    };
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => sys::cgroup2_root().context("finding the cgroup v2 mount")?,
    };
    let config = AgentConfig {
        node,
        source,
        cgroup,
        pin_dir: args.pin_dir,
        admin_socket: args.admin_socket,
        readiness_addr: addr("readiness-addr", &args.readiness_addr)?,
        metrics_addr: addr("metrics-addr", &args.metrics_addr)?,
    };
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");
    app::run(config).await
}
