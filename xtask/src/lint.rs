//! `cargo xtask lint`: rustfmt and clippy over the host crates and, separately, the eBPF crate.

use std::process::Command;

use anyhow::{Result, bail};

use crate::ebpf::{self, Toolchain};
use crate::step::Step;
use crate::{cmd, workspace};

const FIX_CLIPPY: &str =
    "fix the lints above, or `#[expect(lint, reason = \"…\")]` where one is wrong";

/// Builds the object first (mesh-agent's build script embeds it), then runs every check and reports
/// all that failed, so one CI run shows every problem.
pub fn run() -> Result<()> {
    let toolchain = Toolchain::prepare()?;
    ebpf::build(&toolchain)?;

    let mut failed = Vec::new();
    let mut check = |label: &str, cargo: &mut Command, hint: &str| {
        let step = Step::loud(label);
        match cmd::run(cargo) {
            Ok(()) => step.done(),
            Err(err) => {
                step.finish("FAILED");
                failed.push(format!("{label}: {hint}\n  ({err})"));
            }
        }
    };

    let mut fmt = workspace::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    check(
        "checking formatting",
        &mut fmt,
        "formatting differs (diff above): run `cargo fmt --all`",
    );

    let mut host = workspace::cargo();
    host.args([
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    check("clippy on the host crates", &mut host, FIX_CLIPPY);

    // meshctl must build where no kernel object exists (a laptop, a CI job without bpf-linker):
    // point the object nowhere, so a build script that needs it fails this step.
    let mut meshctl = workspace::cargo();
    meshctl
        .args([
            "build",
            "-p",
            "mesh-agent",
            "--bin",
            "meshctl",
            "--no-default-features",
        ])
        .env("MESH_EBPF_OBJECT", "/nonexistent/mesh-ebpf-object");
    check(
        "meshctl without the kernel object",
        &mut meshctl,
        "mesh-agent's build script or library needs the object without the `datapath` feature",
    );

    let mut kernel = toolchain.cargo("clippy")?;
    kernel.args([
        "-p",
        "mesh-ebpf",
        "--release",
        "--target",
        ebpf::TARGET,
        "-Z",
        "build-std=core",
    ]);
    kernel.args(["--", "-D", "warnings"]);
    check(
        "clippy on mesh-ebpf (bpfel-unknown-none)",
        &mut kernel,
        FIX_CLIPPY,
    );

    if !failed.is_empty() {
        bail!("{}", failed.join("\nerror: "));
    }
    Ok(())
}
