//! `mesh-agent`: the per-node daemon (a `DaemonSet` in Kubernetes).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    app,
    config::{self, AgentConfig, RawConfig},
    datapath::{cleanup, coexist},
    logging, sys,
};

/// The mesh's node agent: attaches the kernel data path and keeps it in step with the cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, global = true, default_value = config::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Admin API socket (gRPC, mode 0600).
    #[arg(long, global = true, default_value = config::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// Start even when another socket load balancer (Cilium, Calico) has programs on the
    /// cgroup's connect/sendmsg/sockops hooks; by default the agent refuses, naming them.
    #[arg(long, env = "MESH_COEXIST")]
    coexist: bool,
    /// Readiness endpoint (`GET /healthz/ready`); `none` to disable.
    #[arg(long, default_value = config::DEFAULT_READINESS_ADDR)]
    readiness_addr: String,
    /// Prometheus metrics endpoint (`/metrics`, `/stats/prometheus`); `none` to disable.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = config::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// One JSON line per finished connection on stdout (`true`/`false`; default false, as
    /// Istio's access logs).
    #[arg(long, env = "MESH_ACCESS_LOG")]
    access_log: Option<String>,
    /// Longest time an access line waits in its buffer before it is written (default 200ms;
    /// Envoy's `--file-flush-interval-msec`).
    #[arg(long, env = "MESH_ACCESS_LOG_FLUSH_INTERVAL")]
    access_log_flush_interval: Option<String>,
    /// OTLP/gRPC collector the connection logs are exported to (`http://host:4317`); none by
    /// default.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0..=1 (default 0.01, Istio's); children follow their parent.
    #[arg(long, env = "MESH_TRACE_SAMPLING")]
    trace_sampling: Option<String>,
    /// First delay before a failed discovery source is restarted (doubled per failure).
    #[arg(long, env = "MESH_RESTART_BACKOFF")]
    restart_backoff: Option<String>,
    /// Longest delay between restarts of a failing discovery source.
    #[arg(long, env = "MESH_RESTART_BACKOFF_MAX")]
    restart_backoff_max: Option<String>,
    /// How the Kubernetes source gets each watch's initial state: `auto` (default: streaming
    /// lists, or lists when the API server refuses them), `stream`, or `list`.
    #[arg(long, env = "MESH_LIST_MODE")]
    list_mode: Option<String>,
    /// How long the proxies get to finish at shutdown (Istio's `terminationDrainDuration`).
    #[arg(long, env = "MESH_DRAIN_PERIOD")]
    drain_period: Option<String>,
    /// Same-node pod-to-pod bypass (`true`/`false`): `false` makes every connection of this node
    /// take the TCP/IP stack.
    #[arg(long, env = "MESH_BYPASS")]
    bypass: Option<String>,
    /// Trust domain of workload SPIFFE ids (default cluster.local).
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Root namespace: its namespace-wide security policies are mesh-wide (default: the agent's
    /// own namespace from the downward API, else mesh-system).
    #[arg(long, env = "POD_NAMESPACE")]
    root_namespace: Option<String>,
    /// Node addresses pods reach the outbound listener (15001) at, one IPv4 and/or one IPv6,
    /// comma-separated (the `DaemonSet` gives the node's `status.hostIP`). Unset: enrolled
    /// cross-node connects fail at once (never plaintext).
    #[arg(long, env = "MESH_CAPTURE_ADDRESS")]
    capture_address: Option<String>,
    /// Interfaces where plaintext from other nodes to STRICT pods is dropped, comma-separated
    /// (default: the interfaces of the default routes).
    #[arg(long, env = "MESH_UPLINKS")]
    uplinks: Option<String>,
    /// HBONE proxy worker threads, 1..=64 (default 2, as ztunnel, or the CPUs when fewer).
    #[arg(long, env = "MESH_PROXY_WORKERS")]
    proxy_workers: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(flatten)]
    identity: mesh_agent::identity::cli::AgentCaArgs,
    /// The flow API for the relay (TCP + mTLS; off by default).
    #[command(flatten)]
    flow_api: mesh_agent::relay::flow_api::FlowApiArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Remove every program, link, map and pin the agent made (uninstall); refuses while an
    /// agent runs. Uses --pin-dir, --cgroup and --admin-socket.
    Cleanup,
    /// The mesh CA (gRPC over TLS 1.3 on 15012): signs workload certificates for node agents.
    Ca(Box<mesh_agent::identity::cli::CaArgs>),
    /// The ingress gateway: Gateway API routes (`--routes FILE`), backends from the same
    /// discovery sources as the agent (`--config-file` or `--kubernetes`). Stateless.
    Gateway(Box<mesh_agent::gateway::GatewayArgs>),
    /// The relay (a Deployment, as Hubble Relay): follows every agent's flows over mTLS and
    /// serves them merged on 4245 (`meshctl --server`), and a live service map page on 8081.
    Relay(Box<mesh_agent::relay::RelayArgs>),
}

/// jemalloc returns freed pages to the kernel, where glibc kept the initial sync's high-water
/// mark resident (see `mesh_agent::heap`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_json);
    if let Some(Command::Cleanup) = args.command {
        return run_cleanup(args);
    }
    if let Some(Command::Ca(ca)) = args.command {
        return Ok(mesh_agent::identity::cli::run(*ca).await?);
    }
    if let Some(Command::Gateway(gw)) = args.command {
        return Ok(mesh_agent::gateway::run(*gw).await?);
    }
    if let Some(Command::Relay(relay)) = args.command {
        return Ok(mesh_agent::relay::run(*relay).await?);
    }
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
    let config = AgentConfig::from_raw(RawConfig {
        node: Some(node),
        config_file: args.config_file,
        kubernetes: args.kubernetes,
        cgroup: Some(cgroup),
        pin_dir: Some(args.pin_dir),
        admin_socket: Some(args.admin_socket),
        readiness_addr: Some(args.readiness_addr),
        metrics_addr: Some(args.metrics_addr),
        access_log: args.access_log,
        access_log_flush_interval: args.access_log_flush_interval,
        otlp_endpoint: args.otlp_endpoint,
        trace_sampling: args.trace_sampling,
        restart_backoff: args.restart_backoff,
        restart_backoff_max: args.restart_backoff_max,
        list_mode: args.list_mode,
        drain_period: args.drain_period,
        bypass: args.bypass,
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        capture_address: args.capture_address,
        uplinks: args.uplinks,
        proxy_workers: args.proxy_workers,
    })?;
    mesh_agent::logging::set_access_flush_interval(config.telemetry.access_log_flush_interval);
    if !args.coexist {
        coexist::refuse_foreign(&config.datapath.cgroup, &config.datapath.pin_dir)?;
    }
    let mut config = config;
    if let Some(manager) = args.identity.manager(&config.mesh.trust_domain)? {
        mesh_agent::identity::manager::install(manager);
        // Workloads can get certificates: the HBONE proxies serve them.
        config.proxy.enabled = true;
    }
    args.flow_api
        .install(&config.mesh.trust_domain, &args.identity)?;
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");
    app::run(config).await
}

/// `mesh-agent cleanup`: prints each object it removed.
fn run_cleanup(args: Args) -> anyhow::Result<()> {
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => sys::cgroup2_root().context("finding the cgroup v2 mount")?,
    };
    let cfg = cleanup::CleanupConfig {
        pin_dir: args.pin_dir,
        cgroup,
        admin_socket: args.admin_socket,
    };
    let report = cleanup::cleanup(&cfg)?;
    for line in &report.removed {
        println!("removed {line}");
    }
    // The HBONE reply routing (ip rule, local route table, mangle chain) of this netns.
    for line in mesh_agent::proxy::transparent::uninstall() {
        println!("removed {line}");
    }
    println!("cleanup done: {} objects removed", report.removed.len());
    Ok(())
}
