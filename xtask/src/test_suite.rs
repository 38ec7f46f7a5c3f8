//! `cargo xtask test`: the workspace tests, with an account of which kernel tests ran or skipped.
//!
//! Kernel tests need root, bpffs and cgroup v2; without them they skip rather than fail. A suite that
//! skipped must not pass for one that ran, so the harness leaves a marker per test in
//! `target/kernel-tests/{ran,skipped}/<name>` (a skip marker may hold the reason) and this command
//! counts them; under `CI=true` no kernel test may skip and at least one must run.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::ebpf::{self, Toolchain};
use crate::step::Step;
use crate::{cmd, deps, workspace};

/// What the kernel-test markers say after a run.
struct KernelTally {
    ran: Vec<String>,
    /// Name and the reason the harness wrote (may be empty).
    skipped: Vec<(String, String)>,
}

/// Runs install-deps, build-ebpf and `cargo test --workspace --exclude mesh-ebpf --no-fail-fast
/// <cargo_args>`; `main` prints the total time.
pub fn run(cargo_args: &[String]) -> Result<()> {
    deps::install()?;
    ebpf::build(&Toolchain::prepare()?)?;

    let markers = markers_dir();
    let step = Step::quiet(format!("clearing {}", markers.display()));
    match std::fs::remove_dir_all(&markers) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| {
                format!("cannot delete {}; delete it by hand", markers.display())
            });
        }
        _ => step.done(),
    }

    // The agent tests run the real `mesh-agent` and `meshctl`; `cargo test` builds the bins only
    // of packages with integration tests of their own, so build them explicitly.
    let step = Step::loud("building mesh-agent and meshctl");
    cmd::run(workspace::cargo().args(["build", "-p", "mesh-agent", "--bins"]))
        .context("building mesh-agent failed: see above")?;
    step.done();

    let step = Step::loud("running the workspace tests");
    let status = cmd::status(
        workspace::cargo()
            // --no-fail-fast: every test binary runs, so all failures show and the kernel tally
            // counts the whole suite.
            .args([
                "test",
                "--workspace",
                "--exclude",
                "mesh-ebpf",
                "--no-fail-fast",
            ])
            .args(cargo_args),
    )?;
    if status.success() {
        step.done();
    } else {
        step.finish("FAILED");
    }

    let tally = KernelTally::read(&markers)?;
    println!(
        "==> kernel tests: {} ran, {} skipped",
        tally.ran.len(),
        tally.skipped.len()
    );
    for (name, reason) in &tally.skipped {
        if reason.is_empty() {
            println!("      skipped: {name}");
        } else {
            println!("      skipped: {name} ({reason})");
        }
    }

    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!(
            "cargo test failed ({status}): see the failures above; rerun one with \
             `cargo xtask test -- -p <crate> <test name>`"
        ));
    }
    let in_ci = std::env::var("CI").is_ok_and(|ci| ci == "true");
    if in_ci && !tally.skipped.is_empty() {
        let names: Vec<&str> = tally
            .skipped
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        problems.push(format!(
            "kernel suite did not run in CI: {} ran, {} skipped ({}); kernel tests need root, bpffs \
             at /sys/fs/bpf and cgroup v2: run .ci/run as root (skip reasons above)",
            tally.ran.len(),
            names.len(),
            names.join(", ")
        ));
    } else if in_ci && tally.ran.is_empty() {
        problems.push(format!(
            "kernel suite did not run in CI: 0 ran, 0 skipped; no test wrote a marker under {}: \
             check that the kernel tests were built and not filtered out",
            markers.display()
        ));
    }
    if !problems.is_empty() {
        bail!(problems.join("\nerror: "));
    }
    Ok(())
}

/// `<workspace>/target/kernel-tests`, where the harness writes its markers.
fn markers_dir() -> PathBuf {
    workspace::root().join("target/kernel-tests")
}

impl KernelTally {
    fn read(markers: &Path) -> Result<Self> {
        let ran = list(&markers.join("ran"))?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let skipped = list(&markers.join("skipped"))?;
        Ok(Self { ran, skipped })
    }
}

/// Marker names in `dir` (sorted) with their first line; a missing directory means none.
fn list(dir: &Path) -> Result<Vec<(String, String)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let first_line = std::fs::read_to_string(entry.path())
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        names.push((entry.file_name().to_string_lossy().into_owned(), first_line));
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::KernelTally;

    #[test]
    fn tally_counts_markers_and_keeps_skip_reasons() {
        let dir = std::env::temp_dir().join(format!("xtask-tally-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ran")).unwrap();
        std::fs::create_dir_all(dir.join("skipped")).unwrap();
        std::fs::write(dir.join("ran/connect4_lb"), "").unwrap();
        std::fs::write(dir.join("skipped/sockops_bypass"), "needs root\n").unwrap();
        let tally = KernelTally::read(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tally.ran, ["connect4_lb"]);
        assert_eq!(
            tally.skipped,
            [("sockops_bypass".to_owned(), "needs root".to_owned())]
        );

        let none = KernelTally::read(&std::env::temp_dir().join("xtask-tally-missing")).unwrap();
        assert!(none.ran.is_empty() && none.skipped.is_empty());
    }
}
