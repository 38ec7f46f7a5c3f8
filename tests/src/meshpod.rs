//! The `meshpod` workload tool: where its binary is, the JSON it prints, and helpers to run it in
//! a node or pod.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::exec::{PodChild, Sandbox};

/// Environment variable naming the `meshpod` binary explicitly.
pub const MESHPOD_ENV: &str = "MESHPOD";

/// How long [`Sandbox::serve`] waits for `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// p50 and p99 of a latency sample, in microseconds (0 when there was no sample).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile (nearest rank).
    pub p99: u64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted in place).
    #[must_use]
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let rank = |p: usize| {
            let idx = (samples.len() * p).div_ceil(100).max(1) - 1;
            samples[idx.min(samples.len() - 1)]
        };
        Self {
            p50: rank(50),
            p99: rank(99),
        }
    }
}

/// What `meshpod hit` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitReport {
    /// Connections per backend name (the first line the server sent).
    pub counts: BTreeMap<String, u64>,
    /// Failed connections per error (`ECONNREFUSED`, `ETIMEDOUT`, … or `TIMEOUT` for meshpod's
    /// own deadline, `EOF` when the server closed before sending its name).
    pub errors: BTreeMap<String, u64>,
    /// Connections whose `getpeername()` differed from `--addr`.
    pub peer_mismatch: u64,
    /// Connect latency (TCP) or request→reply time (UDP) of successful connections.
    pub connect_us: Percentiles,
    /// Per connection, in order: the backend name or the error.
    pub per_conn: Vec<String>,
}

impl HitReport {
    /// Successful connections.
    #[must_use]
    pub fn ok(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Failed connections.
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What `meshpod transfer` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    /// Backend name (first line from the server).
    #[serde(default)]
    pub name: String,
    /// Bytes sent.
    pub sent: u64,
    /// Echoed bytes received (after the name line).
    pub received: u64,
    /// SHA-256 of what was sent (hex).
    pub sha256_sent: String,
    /// SHA-256 of what came back (hex).
    pub sha256_received: String,
    /// Set when the transfer stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `meshpod rr` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RrReport {
    /// Backend name (first line from the server).
    #[serde(default)]
    pub name: String,
    /// Round trips asked for.
    pub count: u64,
    /// Round trips whose echo matched.
    pub ok: u64,
    /// Round-trip time of the matching ones.
    pub rtt_us: Percentiles,
    /// Set when the run stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `meshpod` binary: `$MESHPOD`, else `$CARGO_BIN_EXE_meshpod`, else `meshpod` next to the
/// running executable or its parent (`target/<profile>/deps/x` → `target/<profile>/meshpod`).
pub fn meshpod_path() -> Result<PathBuf> {
    for var in [MESHPOD_ENV, "CARGO_BIN_EXE_meshpod"] {
        if let Some(p) = std::env::var_os(var).map(PathBuf::from)
            && p.is_file()
        {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe().context("failed to find the current executable")?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("meshpod"))
        .find(|p| p.is_file());
    match found {
        Some(p) => Ok(p),
        None => bail!(
            "meshpod binary not found next to {} (build it: `cargo build -p mesh-tests --bin meshpod`, or set {MESHPOD_ENV})",
            exe.display()
        ),
    }
}

/// Parses the last non-empty stdout line as JSON.
pub fn parse_json_line<T: DeserializeOwned>(stdout: &[u8]) -> Result<T> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output line")?;
    serde_json::from_str(line).with_context(|| format!("bad JSON line {line:?}"))
}

impl Sandbox {
    /// A `meshpod` command that runs here.
    pub fn meshpod(&self) -> Result<std::process::Command> {
        Ok(self.command(meshpod_path()?))
    }

    /// Starts `meshpod serve --name NAME` on the given addresses and waits until it is listening.
    pub fn serve(&self, name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<PodChild> {
        let mut cmd = self.meshpod()?;
        cmd.args(["serve", "--name", name]);
        for a in tcp {
            cmd.arg("--tcp").arg(a.to_string());
        }
        for a in udp {
            cmd.arg("--udp").arg(a.to_string());
        }
        let mut child = self.spawn(cmd)?;
        child.wait_ready(READY_TIMEOUT).with_context(|| {
            format!(
                "meshpod serve {name} in {} never became ready",
                self.label()
            )
        })?;
        Ok(child)
    }

    /// Starts `meshpod serve` listening on `count` consecutive TCP ports from `first`, each
    /// answering `NAME:PORT`: one process standing in for thousands of endpoints.
    pub fn serve_ports(&self, name: &str, first: SocketAddr, count: u16) -> Result<PodChild> {
        let mut cmd = self.meshpod()?;
        cmd.args(["serve", "--name", name, "--tcp"])
            .arg(first.to_string())
            .args(["--tcp-ports", &count.to_string()]);
        let mut child = self.spawn(cmd)?;
        child.wait_ready(READY_TIMEOUT).with_context(|| {
            format!(
                "meshpod serve {name} ({count} ports) in {} never became ready",
                self.label()
            )
        })?;
        Ok(child)
    }

    /// Runs `meshpod hit --addr ADDR --count N EXTRA…` to completion and parses its report.
    pub fn hit(&self, addr: SocketAddr, count: usize, extra: &[&str]) -> Result<HitReport> {
        let mut args = vec![
            "hit".to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--count".to_owned(),
            count.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.meshpod_json(&args)
    }

    /// Runs `meshpod transfer --addr ADDR --bytes B` and parses its report.
    pub fn transfer(&self, addr: SocketAddr, bytes: u64) -> Result<TransferReport> {
        self.meshpod_json(&[
            "transfer".to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--bytes".to_owned(),
            bytes.to_string(),
        ])
    }

    /// Runs `meshpod rr --addr ADDR --count N --size S` and parses its report.
    pub fn rr(&self, addr: SocketAddr, count: usize, size: usize) -> Result<RrReport> {
        self.meshpod_json(&[
            "rr".to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--count".to_owned(),
            count.to_string(),
            "--size".to_owned(),
            size.to_string(),
        ])
    }

    /// Runs `meshpod ARGS…` to completion and parses its JSON line (also when it exited non-zero
    /// but still reported).
    pub fn meshpod_json<T: DeserializeOwned>(&self, args: &[String]) -> Result<T> {
        let mut cmd = self.meshpod()?;
        cmd.args(args);
        let out = self.output(cmd)?;
        parse_json_line(&out.stdout).with_context(|| {
            format!(
                "meshpod {} in {} ({}) printed no report; stderr: {}",
                args.join(" "),
                self.label(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }
}

/// Adds `n` pods named `{prefix}{i}` to `node`, each running `meshpod serve` under its own name
/// on TCP `port` of its IPv4 address. Keep the returned children: dropping one stops its server.
pub fn backend_pods(
    cluster: &crate::Cluster,
    node: &crate::NodeHandle,
    prefix: &str,
    n: usize,
    port: u16,
) -> Result<(Vec<crate::PodHandle>, Vec<PodChild>)> {
    let mut pods = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        let pod = cluster.add_pod(node, &format!("{prefix}{i}"))?;
        servers.push(pod.serve(pod.name(), &[SocketAddr::new(pod.ipv4().into(), port)], &[])?);
        pods.push(pod);
    }
    Ok((pods, servers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(Percentiles::of(&mut v), Percentiles { p50: 50, p99: 99 });
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        assert_eq!(Percentiles::of(&mut [7]), Percentiles { p50: 7, p99: 7 });
    }

    #[test]
    fn hit_report_round_trips() {
        let line = r#"{"counts":{"a":2},"errors":{"ECONNREFUSED":1},"peer_mismatch":0,"connect_us":{"p50":10,"p99":20},"per_conn":["a","ECONNREFUSED","a"]}"#;
        let r: HitReport = parse_json_line(format!("noise\n{line}\n").as_bytes()).unwrap();
        assert_eq!((r.ok(), r.failed()), (2, 1));
        assert_eq!(serde_json::to_string(&r).unwrap(), line);
    }
}
