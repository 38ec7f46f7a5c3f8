//! `cargo xtask demo`: the cluster-in-a-box demo (root: namespaces, cgroups, eBPF).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::ebpf::{self, Toolchain};
use crate::step::Step;
use crate::{cmd, deps, workspace};

/// Runs install-deps, build-ebpf and the `mesh-demo` binary of `mesh-tests`, as root.
pub fn run(demo_args: &[String]) -> Result<()> {
    if !cmd::is_root() {
        return rerun_with_sudo(demo_args);
    }
    deps::install()?;
    ebpf::build(&Toolchain::prepare()?)?;
    // The demo runs the real agent, the CLI and the pods' workload tool, found next to itself.
    workspace::build_release_binaries()?;
    let step = Step::loud("running mesh-demo");
    cmd::run(
        workspace::cargo()
            .args([
                "run",
                "-p",
                "mesh-tests",
                "--bin",
                "mesh-demo",
                "--release",
                "--",
            ])
            .args(demo_args),
    )
    .context("mesh-demo failed: see its output above")?;
    step.done();
    Ok(())
}

/// Re-runs this very command under `sudo`, keeping the caller's toolchain (`PATH`, `CARGO_HOME`,
/// `RUSTUP_HOME`; sudo would otherwise reset `PATH` to `secure_path`).
fn rerun_with_sudo(demo_args: &[String]) -> Result<()> {
    let Some(sudo) = cmd::which("sudo") else {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF) and sudo is not installed: \
             run `cargo xtask demo` as root"
        );
    };
    let exe =
        std::env::current_exe().context("cannot find the xtask binary to re-run it under sudo")?;
    let home = std::env::var_os("HOME").unwrap_or_default();
    let home = std::path::Path::new(&home);
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(|| home.join(".cargo"), Into::into);
    let rustup_home =
        std::env::var_os("RUSTUP_HOME").map_or_else(|| home.join(".rustup"), Into::into);
    let mut env_args = vec![
        format!("PATH={}", std::env::var("PATH").unwrap_or_default()),
        format!("CARGO_HOME={}", cargo_home.display()),
        format!("RUSTUP_HOME={}", rustup_home.display()),
    ];
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        env_args.push(format!("RUSTUP_TOOLCHAIN={toolchain}"));
    }
    println!("==> the demo needs root: re-running under sudo");
    let mut sudo = Command::new(sudo);
    sudo.arg("env")
        .args(env_args)
        .arg(exe)
        .arg("demo")
        .arg("--")
        .args(demo_args);
    let status = cmd::status(&mut sudo)?;
    if !status.success() {
        bail!(
            "`sudo … xtask demo` failed ({status}): see above; or run `cargo xtask demo` as root"
        );
    }
    Ok(())
}
