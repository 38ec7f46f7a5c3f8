//! bpf-linker, built once per toolchain against that toolchain's own libLLVM and then reused.
//!
//! rustc emits LLVM bitcode for `bpfel-unknown-none`; the linker must read it with the same LLVM.
//! Debian has no LLVM as new as rustc's, but every rustup toolchain ships its libLLVM as a shared
//! library, so the linker is linked against that file. The install directory is keyed by the file's
//! name (`libLLVM.so.22.1-rust-1.95.0-stable`): a toolchain with another LLVM gets its own linker,
//! and a second run finds the first one's and reuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;
use crate::step::{Step, warn};
use crate::toolchain::Rustc;

/// The bpf-linker release the project pins (see `shared/ebpf-toolchain.md`).
const VERSION: &str = "0.13.0";
/// LLVM majors that bpf-linker 0.13.0 has an `llvm-<major>` feature for.
const SUPPORTED_LLVM_MAJORS: &[u32] = &[21, 22, 23];

/// Where `install` puts the linker for one libLLVM, and the prefix it is linked against.
struct Layout {
    /// `${CARGO_HOME:-$HOME/.cargo}/mesh-tools/bpf-linker/<libLLVM file name>`.
    root: PathBuf,
    libllvm: PathBuf,
}

impl Layout {
    fn new(cargo_home: &Path, libllvm: PathBuf) -> Result<Self> {
        let key = libllvm
            .file_name()
            .context("libLLVM path has no file name")?;
        Ok(Self {
            root: cargo_home.join("mesh-tools/bpf-linker").join(key),
            libllvm,
        })
    }

    /// The libLLVM file name that keys this install.
    fn key(&self) -> String {
        self.libllvm
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `LLVM_PREFIX` for the build; the linker keeps an RPATH to its `lib/`, so it must stay.
    fn llvm_prefix(&self) -> PathBuf {
        self.root.join("llvm")
    }

    fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    fn binary(&self) -> PathBuf {
        self.bin_dir().join("bpf-linker")
    }
}

pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home =
        std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set; set one of them")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Makes sure a working bpf-linker for the active toolchain exists; returns the directory to put on
/// `PATH` for the eBPF build.
pub fn ensure(rustc: &Rustc) -> Result<PathBuf> {
    let (major, _) = rustc.llvm_major_minor()?;
    let layout = Layout::new(&cargo_home()?, rustc.libllvm()?)?;

    let step = Step::quiet(format!(
        "checking bpf-linker {VERSION} for {}",
        layout.key()
    ));
    link_prefix(&layout)?;
    match installed_version(&layout) {
        Ok(()) => {
            step.finish(&format!("reusing {}", layout.root.display()));
            return Ok(layout.bin_dir());
        }
        Err(why) => step.finish(&format!("not usable ({why})")),
    }

    if !SUPPORTED_LLVM_MAJORS.contains(&major) {
        bail!(
            "rustc {} uses LLVM {}, but bpf-linker {VERSION} only supports LLVM \
             {SUPPORTED_LLVM_MAJORS:?}: \
             use a toolchain whose LLVM it supports (1.95 has LLVM 22) or bump the pinned bpf-linker \
             in xtask/src/linker.rs",
            rustc.release,
            rustc.llvm_version
        );
    }
    install(&layout, major)?;

    let step = Step::quiet(format!("verifying {}", layout.binary().display()));
    installed_version(&layout).map_err(|why| {
        anyhow::anyhow!(
            "bpf-linker was installed but does not run: {why}; delete {} and rerun",
            layout.root.display()
        )
    })?;
    step.done();
    Ok(layout.bin_dir())
}

/// The prefix `lib/` holds two symlinks to the toolchain's libLLVM: `libLLVM.so` for the build to
/// link against, and the file's own name (its soname) for the binary to load at run time. They are
/// refreshed every run, so a reinstalled toolchain with the same libLLVM name keeps the linker working.
fn link_prefix(layout: &Layout) -> Result<()> {
    let lib = layout.llvm_prefix().join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let own_name = layout
        .libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), own_name] {
        let link = lib.join(name);
        if std::fs::read_link(&link).is_ok_and(|target| target == layout.libllvm) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&layout.libllvm, &link).with_context(|| {
            format!(
                "cannot link {} -> {}",
                link.display(),
                layout.libllvm.display()
            )
        })?;
    }
    Ok(())
}

/// `Ok` when the installed binary runs and reports the pinned version.
fn installed_version(layout: &Layout) -> Result<(), String> {
    let binary = layout.binary();
    if !binary.exists() {
        return Err("not installed".into());
    }
    let output = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run it: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`bpf-linker --version` failed: {}", stderr.trim()));
    }
    if stdout.trim() == format!("bpf-linker {VERSION}") {
        Ok(())
    } else {
        Err(format!("it reports `{}`, want {VERSION}", stdout.trim()))
    }
}

fn install(layout: &Layout, major: u32) -> Result<()> {
    let step = Step::loud(format!(
        "installing bpf-linker {VERSION} (llvm-{major}) into {} (about 1-4 min)",
        layout.root.display()
    ));
    let install = |locked: bool| {
        let mut cargo = Command::new("cargo");
        cargo
            .env("LLVM_PREFIX", layout.llvm_prefix())
            .args(["install", &format!("bpf-linker@{VERSION}")]);
        if locked {
            cargo.arg("--locked");
        }
        cargo
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            // A binary that exists but does not run (moved directory, other toolchain) must be
            // rebuilt; without --force cargo would call it up to date.
            .arg("--force")
            .arg("--root")
            .arg(&layout.root);
        cmd::status(&mut cargo)
    };
    if !install(true)?.success() {
        warn(
            "`cargo install --locked` failed; retrying without --locked \
             (newest compatible dependencies)",
        );
        let status = install(false)?;
        if !status.success() {
            bail!(
                "installing bpf-linker {VERSION} failed ({status}): see cargo's output above; it needs \
                 network access to crates.io and a C/C++ toolchain (apt-get install build-essential); \
                 {} must be readable",
                layout.libllvm.display()
            );
        }
    }
    step.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Layout;
    use std::path::Path;

    #[test]
    fn layout_is_keyed_by_the_libllvm_file_name() {
        let layout = Layout::new(
            Path::new("/root/.cargo"),
            "/t/lib/libLLVM.so.22.1-rust-1.95.0-stable".into(),
        )
        .unwrap();
        assert_eq!(
            layout.binary(),
            Path::new(
                "/root/.cargo/mesh-tools/bpf-linker/libLLVM.so.22.1-rust-1.95.0-stable/bin/bpf-linker"
            )
        );
        assert_eq!(
            layout.llvm_prefix(),
            Path::new("/root/.cargo/mesh-tools/bpf-linker/libLLVM.so.22.1-rust-1.95.0-stable/llvm")
        );
    }
}
