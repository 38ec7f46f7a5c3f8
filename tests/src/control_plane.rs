//! The control-plane benchmark (`cargo xtask bench control-plane`): the real agent reconciling
//! 10,000 services × 10 endpoints from a static file into the kernel — time, resident memory,
//! and the rate at which endpoint changes reach the kernel.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Cluster,
    agent::{AgentProcess, write_atomically},
};

/// One row of results: (metric, value).
pub type Metric = (String, f64);

/// A static model of `services` services with `endpoints` endpoints each; `generation` shifts
/// one endpoint of the first `changed` services (endpoint churn).
#[must_use]
pub fn model(services: usize, endpoints: usize, changed: usize, generation: usize) -> String {
    let mut y = String::from("services:\n");
    for s in 0..services {
        let (hi, lo) = (s / 250, s % 250 + 1);
        let _ = write!(
            y,
            "  - name: svc-{s}\n    clusterIPs: [10.96.{hi}.{lo}]\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints:\n"
        );
        for e in 0..endpoints {
            let shift = if s < changed && e == 0 {
                generation * 16
            } else {
                0
            };
            let _ = writeln!(
                y,
                "      - {{ ip: 10.{}.{}.{} }}",
                100 + s / 250 % 100,
                s % 250,
                e + 1 + shift
            );
        }
    }
    y
}

/// Reads `took_ms=N` of the `n`-th "reconciled" line the agent logged.
fn reconcile_ms(log: &str, n: usize) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("reconciled"))
        .nth(n)?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("took_ms="))?
        .parse()
        .ok()
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

fn wait_for_reconcile(agent: &AgentProcess, n: usize, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(ms) = reconcile_ms(&agent.stderr(), n) {
            return Ok(ms);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("agent did not log reconciliation #{n}: {}", agent.stderr())
}

/// Runs the benchmark; `quick` uses 1,000 services.
pub fn run(quick: bool) -> Result<Vec<Metric>> {
    let services = if quick { 1_000 } else { 10_000 };
    let endpoints = 10;
    let changed = services / 5;
    let cluster = Cluster::new("bench-control-plane")?;
    let node = cluster.add_node("a")?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let file = work.join("mesh.yaml");
    write_atomically(&file, &model(services, endpoints, 0, 0))?;
    let mut agent = AgentProcess::new(
        node,
        file.clone(),
        cluster.bpffs_dir()?.join("a"),
        work.join("admin.sock"),
    );
    agent.ready_timeout = Duration::from_mins(2);
    let started = Instant::now();
    agent.start()?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let reconcile = wait_for_reconcile(&agent, 0, Duration::from_secs(5))?;
    let pid = agent.pid().context("agent pid")?;
    let rss = rss_mb(pid)?;
    // Endpoint churn: one endpoint of `changed` services moves; the agent writes only those.
    write_atomically(&file, &model(services, endpoints, changed, 1))?;
    let churn_ms = wait_for_reconcile(&agent, 1, Duration::from_mins(1))?;
    let status = agent.meshctl_json(&["status"])?;
    if status["services"].as_u64() != Some(services as u64) {
        bail!(
            "agent holds {} services, expected {services}",
            status["services"]
        );
    }
    let batch = f64::from(u32::try_from(changed)?);
    let per_s = batch / (churn_ms.max(1.0) / 1000.0);
    let label = if quick { "1k" } else { "10k" };
    Ok(vec![
        (format!("reconcile_{label}_services_ms"), reconcile),
        (format!("agent_rss_mb_{label}_services"), rss),
        ("endpoint_updates_per_s".to_owned(), per_s),
        (format!("agent_ready_{label}_services_ms"), ready_ms),
        ("endpoint_churn_batch".to_owned(), batch),
        ("endpoint_churn_reconcile_ms".to_owned(), churn_ms),
    ])
}
