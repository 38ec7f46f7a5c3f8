//! Issue 9's harness pieces shared by the end-to-end tests and the demo: the real CA
//! (`mesh-agent ca`) in a node's namespace, and the environment that points an agent at it
//! (bootstrap token, bundle, capture address, uplink).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::{NodeHandle, PodChild, agent::workspace_binary};

/// The CA's port (istiod's).
pub const CA_PORT: u16 = 15012;

/// A CA run from `dir` (root generated there on first start), listening on `node`'s fabric
/// address, signing for the pods `static_pods` places on each node, workload lifetime `ttl`.
pub struct CaSetup {
    pub node: NodeHandle,
    pub dir: PathBuf,
    pub static_pods: PathBuf,
    pub ttl: String,
}

impl CaSetup {
    /// Where agents reach the CA.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.node.ipv4().into(), CA_PORT)
    }

    /// Starts the CA and waits until it listens.
    pub fn start(&self) -> Result<PodChild> {
        let bin = workspace_binary("mesh-agent")?;
        let mut cmd = self.node.command(&bin);
        cmd.args(["ca", "--listen", &self.addr().to_string()])
            .args(["--metrics-addr", "none", "--workload-ttl", &self.ttl])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--static-pods")
            .arg(&self.static_pods)
            .env("RUST_LOG", "info");
        let mut ca = self.node.spawn(cmd)?;
        ca.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(20))?;
        Ok(ca)
    }

    /// The environment of `node`'s agent: a bootstrap token made for it (written under
    /// `work`), the CA's root, the node's pod gateway as capture address, its fabric interface
    /// as uplink.
    pub fn agent_env(&self, node: &NodeHandle, work: &Path) -> Result<Vec<(String, String)>> {
        let out = std::process::Command::new(workspace_binary("mesh-agent")?)
            .args(["ca", "bootstrap", "--node", node.name(), "--dir"])
            .arg(&self.dir)
            .output()?;
        ensure!(
            out.status.success(),
            "bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = work.join(format!("token-{}", node.name()));
        std::fs::write(&token, &out.stdout)?;
        Ok(vec![
            ("MESH_CA_ADDRESS".into(), self.addr().to_string()),
            ("MESH_CA_SERVER_NAME".into(), "localhost".into()),
            (
                "MESH_CA_ROOT_FILE".into(),
                self.dir
                    .join(mesh_agent::identity::ca::CA_CERT)
                    .display()
                    .to_string(),
            ),
            ("MESH_CA_TOKEN_FILE".into(), token.display().to_string()),
            (
                "MESH_CAPTURE_ADDRESS".into(),
                format!("{},{}", node.gateway_v4(), node.gateway_v6()),
            ),
            ("MESH_UPLINKS".into(), node.fabric_ifname().into()),
        ])
    }
}
