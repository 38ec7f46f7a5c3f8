//! The real `mesh-agent` binary run on a harness node, and `meshctl` talking to it: used by the
//! agent tests and the demo.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{NodeHandle, PodChild};

/// A binary of the workspace built next to the running executable (`target/<profile>/`).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the current executable")?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is not built next to {} (cargo build -p mesh-agent --bins)",
                exe.display()
            )
        })
}

/// Writes a file atomically (write, then rename), so a watcher never reads half of it.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// One node's agent: its flags, and the process while it runs.
pub struct AgentProcess {
    pub node: NodeHandle,
    pub config: PathBuf,
    pub pins: PathBuf,
    pub socket: PathBuf,
    pub log_filter: String,
    /// How long [`Self::start`] waits for readiness.
    pub ready_timeout: Duration,
    /// Discover from the Kubernetes API with this kubeconfig instead of the static file; the
    /// agent then runs in the host's network namespace (where the API stand-in listens) while
    /// still attaching at the node's cgroup.
    pub kubeconfig: Option<PathBuf>,
    /// `--readiness-addr` (default: `127.0.0.1:15021` in the node, `none` with a kubeconfig).
    pub readiness_addr: Option<String>,
    /// Extra environment of the agent process (e.g. the downward API's `POD_NAMESPACE`).
    pub env: Vec<(String, String)>,
    child: Option<PodChild>,
}

impl AgentProcess {
    /// An agent of `node` reading `config`, pinning under `pins`, admin socket `socket`.
    #[must_use]
    pub fn new(node: NodeHandle, config: PathBuf, pins: PathBuf, socket: PathBuf) -> Self {
        Self {
            node,
            config,
            pins,
            socket,
            log_filter: "info,mesh_agent::app=debug".to_owned(),
            ready_timeout: Duration::from_secs(20),
            kubeconfig: None,
            readiness_addr: None,
            env: Vec::new(),
            child: None,
        }
    }

    /// Starts the agent in the node (outside the pods' cgroups) and waits until it is ready.
    pub fn start(&mut self) -> Result<()> {
        self.spawn()?;
        let start = Instant::now();
        while start.elapsed() < self.ready_timeout {
            if self
                .meshctl_json(&["status"])
                .is_ok_and(|s| s["ready"] == true)
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(exit)) = c.try_status()
            {
                bail!(
                    "agent on {} exited ({exit}): {}",
                    self.node.name(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent on {} not ready: {}", self.node.name(), self.stderr());
    }

    /// Starts the agent without waiting for readiness.
    pub fn spawn(&mut self) -> Result<()> {
        let binary = workspace_binary("mesh-agent")?;
        let mut cmd = match &self.kubeconfig {
            None => {
                let mut cmd = self.node.command(binary);
                cmd.arg("--config-file").arg(&self.config).args([
                    "--readiness-addr",
                    self.readiness_addr.as_deref().unwrap_or("127.0.0.1:15021"),
                ]);
                cmd
            }
            Some(kubeconfig) => {
                let mut cmd = Command::new(binary);
                cmd.arg("--kubernetes").env("KUBECONFIG", kubeconfig).args([
                    "--readiness-addr",
                    self.readiness_addr.as_deref().unwrap_or("none"),
                ]);
                cmd
            }
        };
        cmd.arg("--node-name")
            .arg(self.node.name())
            .arg("--cgroup")
            .arg(self.node.cgroup_dir())
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--admin-socket")
            .arg(&self.socket)
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(self.node.spawn(cmd)?);
        Ok(())
    }

    /// Sends SIGTERM and waits for the agent to exit (at most `timeout`); returns its exit
    /// status and what it logged.
    pub fn terminate(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let mut child = self.child.take().context("the agent is not running")?;
        child.signal(nix::sys::signal::Signal::SIGTERM)?;
        let status = child.wait_timeout(timeout);
        let log = child.stderr_text();
        let status = status.with_context(|| format!("agent did not exit after SIGTERM: {log}"))?;
        Ok((status, log))
    }

    /// SIGKILLs the agent (programs stay attached through their pinned links).
    pub fn kill(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = c.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// The agent's pid while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(PodChild::pid)
    }

    /// What the agent logged so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.child
            .as_ref()
            .map(PodChild::stderr_text)
            .unwrap_or_default()
    }

    /// The agent's next stdout line (its access log, `--access-log true`).
    pub fn stdout_line(&mut self, timeout: Duration) -> Result<String> {
        self.child
            .as_mut()
            .context("the agent is not running")?
            .next_line(timeout)
    }

    /// A `meshctl` command aimed at this agent.
    pub fn meshctl_command(&self) -> Result<Command> {
        let mut cmd = Command::new(workspace_binary("meshctl")?);
        cmd.arg("--socket").arg(&self.socket);
        Ok(cmd)
    }

    /// Runs `meshctl ARGS` to completion.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        self.meshctl_command()?
            .args(args)
            .output()
            .context("running meshctl")
    }

    /// Runs `meshctl ARGS -o json` and parses the output.
    pub fn meshctl_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.meshctl(&[args, &["-o", "json"]].concat())?;
        if !out.status.success() {
            bail!(
                "meshctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("meshctl printed no JSON")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
