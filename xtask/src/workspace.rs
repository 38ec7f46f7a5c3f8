//! Where the workspace is, and `cargo` commands that run in it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// `cargo` run from the workspace root.
pub fn cargo() -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(root());
    cargo
}

/// Builds, in release, the binaries the demo and benchmarks run next to themselves
/// (`mesh-agent`, `meshctl`, `meshpod`, …): `cargo run` would build only the one it runs.
pub fn build_release_binaries() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let step = crate::step::Step::loud("building mesh-agent, meshctl and meshpod (release)");
    crate::cmd::run(cargo().args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bins",
    ]))
    .context("building the release binaries failed: see above")?;
    step.done();
    Ok(())
}
