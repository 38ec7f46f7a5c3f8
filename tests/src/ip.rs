//! Thin wrappers around the iproute2 `ip` command, with errors naming the command line.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};

use anyhow::{Context, Result, bail};

/// The `ip` binary: `/usr/sbin/ip` or `/sbin/ip` when present (root's `PATH` under a test runner
/// may lack sbin), else whatever `PATH` finds.
fn ip_binary() -> &'static str {
    static BIN: OnceLock<&'static str> = OnceLock::new();
    BIN.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("ip")
    })
}

/// `ip netns add`/`del` on a host where `/run/netns` is not yet a shared mount race each other
/// (each `ip` bind-mounts it); serialize them within the process.
pub(crate) static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Runs `ip ARGS…` and returns its stdout; the error names the command line and carries stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(args, None)
}

/// Runs `ip -n NETNS ARGS…`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run(&full, None)
}

/// Runs several `ip` commands (one per line, no global options) in NETNS with one process
/// (`ip -n NETNS -batch -`).
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let script = lines.join("\n") + "\n";
    run(&["-n", netns, "-batch", "-"], Some(&script)).map(|_| ())
}

/// Creates a named network namespace.
pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    ip(&["netns", "add", name]).map(|_| ())
}

/// Deletes a named network namespace (its interfaces go once nothing holds it).
pub(crate) fn netns_del(name: &str) -> Result<()> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    ip(&["netns", "del", name]).map(|_| ())
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let bin = ip_binary();
    let shown = || {
        let mut s = format!("`{bin} {}`", args.join(" "));
        if let Some(script) = stdin {
            s.push_str(" with script:\n");
            s.push_str(script);
        }
        s
    };
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", shown()))?;
    if let Some(script) = stdin {
        let mut pipe = child.stdin.take().context("ip stdin not piped")?;
        pipe.write_all(script.as_bytes())
            .with_context(|| format!("failed to feed {}", shown()))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("failed to wait for {}", shown()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
