//! The active Rust toolchain: its version, its bundled libLLVM, and the `rust-src` component.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;
use crate::step::Step;

/// What `rustc -vV` and `rustc --print sysroot` say about the active toolchain.
pub struct Rustc {
    /// `release:` line, e.g. `1.95.0`.
    pub release: String,
    /// `LLVM version:` line, e.g. `22.1.2`.
    pub llvm_version: String,
    /// Toolchain root; its `lib/` holds the libLLVM that rustc itself uses.
    pub sysroot: PathBuf,
}

impl Rustc {
    /// Asks the `rustc` on `PATH` (the rustup proxy honours `RUSTUP_TOOLCHAIN` set by `cargo`).
    pub fn detect() -> Result<Self> {
        let verbose = cmd::output(Command::new("rustc").arg("-vV")).context(
            "reading the toolchain version failed: is rustup/rustc installed and on PATH?",
        )?;
        let field = |name: &str| {
            verbose
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .with_context(|| format!("`rustc -vV` has no `{name}` line:\n{verbose}"))
        };
        let sysroot = cmd::output(Command::new("rustc").args(["--print", "sysroot"]))?;
        Ok(Self {
            release: field("release:")?,
            llvm_version: field("LLVM version:")?,
            sysroot: PathBuf::from(sysroot.trim()),
        })
    }

    /// LLVM major and minor version, e.g. `(22, 1)` for `22.1.2`.
    pub fn llvm_major_minor(&self) -> Result<(u32, u32)> {
        let mut parts = self.llvm_version.split('.').map(str::parse::<u32>);
        match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor)),
            _ => bail!("cannot parse rustc's LLVM version `{}`", self.llvm_version),
        }
    }

    /// The toolchain's own shared libLLVM: `<sysroot>/lib/libLLVM.so.<major>.<minor>-rust-*`.
    pub fn libllvm(&self) -> Result<PathBuf> {
        let (major, minor) = self.llvm_major_minor()?;
        let lib = self.sysroot.join("lib");
        let prefix = format!("libLLVM.so.{major}.{minor}-rust-");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
            .with_context(|| format!("cannot list {}", lib.display()))?
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .map(|entry| entry.path())
            .collect();
        found.sort();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!(
                "no {prefix}* in {}: this toolchain (rustc {}) ships no shared libLLVM to build \
                 bpf-linker against; use a rustup toolchain from rust-lang.org",
                lib.display(),
                self.release
            ),
            many => bail!(
                "several {prefix}* in {}: {}; remove the stale ones or reinstall the toolchain",
                lib.display(),
                many.iter()
                    .map(|path| path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn has_rust_src(&self) -> bool {
        rust_src_dir(&self.sysroot).join("core").is_dir()
    }
}

fn rust_src_dir(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library")
}

/// Adds `rust-src` (needed by `-Z build-std=core`) unless the active toolchain already has it.
pub fn ensure_rust_src(rustc: &Rustc) -> Result<()> {
    let step = Step::quiet("checking rust-src");
    if cmd::which("rustup").is_none() {
        if rustc.has_rust_src() {
            step.finish("present");
            return Ok(());
        }
        bail!(
            "rust-src is missing from {} and rustup is not on PATH: install the rust-src component \
             of rustc {} (it must contain {})",
            rustc.sysroot.display(),
            rustc.release,
            rust_src_dir(&rustc.sysroot).display()
        );
    }
    let installed = cmd::output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        step.finish("already installed");
        return Ok(());
    }
    step.finish("missing");

    let step = Step::quiet("installing rust-src");
    cmd::output(Command::new("rustup").args(["component", "add", "rust-src"])).context(
        "`rustup component add rust-src` failed: check network access to static.rust-lang.org, \
         or install it by hand and rerun",
    )?;
    step.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Rustc;
    use std::path::PathBuf;

    #[test]
    fn llvm_version_splits_into_major_minor() {
        let rustc = Rustc {
            release: "1.95.0".into(),
            llvm_version: "22.1.2".into(),
            sysroot: PathBuf::from("/nonexistent"),
        };
        assert_eq!(rustc.llvm_major_minor().unwrap(), (22, 1));
    }
}
