//! `mesh-agent`: the per-node daemon.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use mesh_agent::{datapath, logging, sys};

/// The mesh's node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// cgroup v2 directory to attach to (default: the cgroup2 mount root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pin_dir: PathBuf,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_json);
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => sys::cgroup2_root().context("finding the cgroup v2 mount")?,
    };
    let cfg = datapath::DatapathConfig {
        cgroup,
        pin_dir: args.pin_dir,
    };
    let mut dp = datapath::Datapath::load(&cfg).context("loading the data path")?;
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(logging::forward_kernel_logs(logger));
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
