//! The Kubernetes API stand-in (`tests/kmock/server.py`, kmock's `KubernetesEmulator` with
//! selectors, resource versions and a request log) run as a child process for tests and the
//! control-plane benchmark.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long the server may take to print its ready line (a large preload takes seconds).
const READY_TIMEOUT: Duration = Duration::from_mins(3);

/// The kmock server, killed (by its pid) when dropped.
pub struct Kmock {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// One JSON line per request the server received (`t`, `method`, `path`, `params`).
    pub requests: PathBuf,
}

impl Kmock {
    /// Starts the server with its request log in `work`, storing the objects of `preload`
    /// (JSON lines `{"resource": "v1/pods", "object": {...}}`) before it listens.
    pub fn start(work: &Path, preload: Option<&Path>) -> Result<Self> {
        Self::start_with(work, preload, &[])
    }

    /// [`Kmock::start`] with more of the server's flags, e.g. `["--watch-list", "off"]` (an API
    /// server without streaming lists).
    pub fn start_with(work: &Path, preload: Option<&Path>, flags: &[&str]) -> Result<Self> {
        ensure_kmock()?;
        let script = crate::workspace_root().join("tests/kmock/server.py");
        let requests = work.join("kmock-requests.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args(["--port", "0", "--log-requests"])
            .arg(&requests)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = preload {
            cmd.arg("--preload").arg(p);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting python3 {}", script.display()))?;
        let stdout = child.stdout.take().context("kmock stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Self {
            child,
            url: String::new(),
            requests,
        };
        let line = rx
            .recv_timeout(READY_TIMEOUT)
            .with_context(|| format!("kmock printed no ready line within {READY_TIMEOUT:?}"))?;
        let Some(url) = line.trim().strip_prefix("ready ") else {
            bail!("kmock did not start: {line:?}");
        };
        url.clone_into(&mut server.url);
        Ok(server)
    }

    /// The requests received so far.
    #[must_use]
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster: {{ server: \"{}\" }}\ncontexts:\n- name: kmock\n  context: {{ cluster: kmock, user: test }}\ncurrent-context: kmock\nusers:\n- name: test\n  user: {{}}\n",
                self.url
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs kmock (from `PyPI`) when `python3` cannot import it; `cargo xtask install-deps` does too.
pub fn ensure_kmock() -> Result<()> {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import kmock"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if importable() {
        return Ok(());
    }
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "kmock"])
            .args(extra)
            .output()
            .context("running python3 -m pip")?;
        if out.status.success() && importable() {
            return Ok(());
        }
    }
    bail!("kmock is not installed and `python3 -m pip install kmock` failed")
}
