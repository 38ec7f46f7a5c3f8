//! Building the kernel object (`mesh-ebpf`) for `bpfel-unknown-none` in its own target directory.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::step::Step;
use crate::{cmd, linker, toolchain, workspace};

/// The eBPF target triple (little-endian; every machine we run on is).
pub const TARGET: &str = "bpfel-unknown-none";
/// Flags for every eBPF cargo invocation, kept identical for build and clippy so both share the
/// `core` built by build-std:
/// - `debuginfo=2` + `--btf`: the linker emits BTF (what aya-build passes);
/// - `target-cpu=v3`: ALU32 and the atomic instructions `mesh-ebpf` uses (a 32-bit
///   compare-and-swap does not exist for the `generic` CPU; it needs Linux 5.12+ to load).
///   This must live here: `CARGO_ENCODED_RUSTFLAGS` overrides any `.cargo/config.toml` rustflags.
const RUSTFLAGS: &[&str] = &[
    "-C",
    "debuginfo=2",
    "-C",
    "link-arg=--btf",
    "-C",
    "target-cpu=v3",
];

/// Target directory of eBPF builds, separate so host builds are never invalidated by them.
pub fn target_dir() -> PathBuf {
    workspace::root().join("target/ebpf")
}

/// The release eBPF object that `mesh-agent` embeds and loads:
/// `<workspace>/target/ebpf/bpfel-unknown-none/release/mesh`.
pub fn ebpf_object_path() -> PathBuf {
    target_dir().join(TARGET).join("release/mesh")
}

/// A ready eBPF toolchain: `rust-src` present and bpf-linker built for the active rustc.
pub struct Toolchain {
    linker_bin: PathBuf,
}

impl Toolchain {
    /// Installs whatever is missing (rust-src, bpf-linker) and reuses what is there.
    pub fn prepare() -> Result<Self> {
        let step = Step::quiet("reading the active toolchain");
        let rustc = toolchain::Rustc::detect()?;
        step.finish(&format!(
            "rustc {}, LLVM {}",
            rustc.release, rustc.llvm_version
        ));
        toolchain::ensure_rust_src(&rustc)?;
        let linker_bin = linker::ensure(&rustc)?;
        Ok(Self { linker_bin })
    }

    /// `cargo <subcommand>` in the workspace with the eBPF environment: `RUSTC_BOOTSTRAP=1` for
    /// `-Z build-std` on stable, the eBPF target directory, bpf-linker first on `PATH`, and exactly
    /// [`RUSTFLAGS`] (inherited host flags are dropped; they would not apply to the BPF target).
    pub fn cargo(&self, subcommand: &str) -> Result<Command> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(self.linker_bin.clone()).chain(std::env::split_paths(&path)),
        )
        .context("a PATH entry contains ':'; fix PATH")?;
        let mut cargo = workspace::cargo();
        cargo
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", target_dir())
            .env("PATH", path)
            .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
            .arg(subcommand);
        Ok(cargo)
    }
}

/// `cargo xtask build-ebpf`: builds the release object with a prepared toolchain, prints its path
/// and size. Release only: unoptimised BPF code calls compiler builtins (`__multi3`) that BPF lacks.
pub fn build(toolchain: &Toolchain) -> Result<PathBuf> {
    let step = Step::loud("building the eBPF object (release)");
    let mut cargo = toolchain.cargo("build")?;
    cargo.args([
        "-p",
        "mesh-ebpf",
        "--bin",
        "mesh",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
        "--release",
    ]);
    cmd::run(&mut cargo).context(
        "building mesh-ebpf failed: read the errors above. Compile errors and LLVM errors naming \
         mesh-ebpf's source (`unsupported atomic operation`, `Cannot select`) are mesh-ebpf's to fix; \
         `linker 'bpf-linker' not found` or a bpf-linker that cannot start is xtask's",
    )?;
    step.done();

    let object = ebpf_object_path();
    let size = std::fs::metadata(&object)
        .with_context(|| {
            format!(
                "cargo succeeded but {} is missing: \
                 does mesh-ebpf still declare `[[bin]] name = \"mesh\"`?",
                object.display()
            )
        })?
        .len();
    if size == 0 {
        bail!(
            "{} is empty; rebuild with `cargo xtask build-ebpf`",
            object.display()
        );
    }
    println!(
        "==> eBPF object: {} ({})",
        object.display(),
        human_size(size)
    );
    Ok(object)
}

fn human_size(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a size shown with one decimal")]
    let kib = bytes as f64 / 1024.0;
    if kib < 1024.0 {
        format!("{kib:.1} KiB, {bytes} bytes")
    } else {
        format!("{:.1} MiB, {bytes} bytes", kib / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ebpf_object_path;
    use crate::workspace;

    #[test]
    fn object_lives_in_the_ebpf_target_dir() {
        assert_eq!(
            ebpf_object_path(),
            workspace::root().join("target/ebpf/bpfel-unknown-none/release/mesh")
        );
        assert!(workspace::root().join("Cargo.toml").is_file());
    }
}
