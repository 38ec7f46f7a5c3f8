//! Kernel-suite accounting: every kernel test leaves a `ran` or `skipped` marker so CI can tell a
//! skipped suite from a passing one.

use std::io::Write as _;
use std::path::PathBuf;

use crate::env::{is_root, workspace_root};

/// Environment variable that overrides the marker directory (default `<workspace>/target/kernel-tests`).
pub const KERNEL_TEST_DIR_ENV: &str = "MESH_KERNEL_TEST_DIR";

/// What a kernel test needs, printed when it is skipped.
pub const SKIP_REQUIREMENT: &str =
    "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) to create namespaces and load eBPF";

/// The directory holding `ran/<name>` and `skipped/<name>` markers.
#[must_use]
pub fn kernel_test_dir() -> PathBuf {
    match std::env::var_os(KERNEL_TEST_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target").join("kernel-tests"),
    }
}

/// Proof that a kernel test is running with the privileges it needs; hold it for the test's length.
#[derive(Debug)]
pub struct KernelTestGuard {
    name: String,
}

impl KernelTestGuard {
    /// The name the test registered under.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Registers a kernel test. Without root it prints why, leaves `skipped/<name>` and returns `None`
/// (the test should return); with root it leaves `ran/<name>` and returns a guard.
///
/// ```no_run
/// let Some(_k) = mesh_tests::kernel_test("smoke") else { return };
/// ```
///
/// # Panics
/// When the marker cannot be written: a test whose run is not recorded would defeat the accounting.
#[must_use]
pub fn kernel_test(name: &str) -> Option<KernelTestGuard> {
    let file = marker_file_name(name);
    let dir = kernel_test_dir();
    let (kind, other) = if is_root() {
        ("ran", "skipped")
    } else {
        // Straight to the stderr handle: the test harness captures `println!`, and a skip must
        // show in CI logs even when the test "passes".
        let line = format!("SKIP kernel test {name}: {SKIP_REQUIREMENT}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        ("skipped", "ran")
    };
    let kind_dir = dir.join(kind);
    if let Err(e) = std::fs::create_dir_all(&kind_dir)
        .and_then(|()| std::fs::write(kind_dir.join(&file), format!("{name}\n")))
    {
        panic!(
            "failed to write kernel-test marker {}: {e}",
            kind_dir.join(&file).display()
        );
    }
    // A test that ran after an earlier skipped run (or the reverse) must be counted once.
    let _ = std::fs::remove_file(dir.join(other).join(&file));
    is_root().then(|| KernelTestGuard {
        name: name.to_owned(),
    })
}

/// Marker names are file names: keep them to one path component.
fn marker_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        "_".to_owned()
    } else {
        cleaned
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `bpf_ktime_get_ns` reads), so a test can hand the
/// data path a "now" (e.g. `Datapath::report_failure`): the agent's own helper.
pub use mesh_agent::flows::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_are_single_components() {
        assert_eq!(marker_file_name("smoke"), "smoke");
        assert_eq!(marker_file_name("a/b::c"), "a_b__c");
        assert_eq!(marker_file_name(".."), "_");
    }
}
