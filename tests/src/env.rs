//! Host environment probes: privileges, the cgroup v2 mount, bpffs and the workspace directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// Where bpffs is expected (and mounted by [`ensure_bpffs`] when missing).
pub const BPFFS_DIR: &str = "/sys/fs/bpf";

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// What was mounted (device or pseudo-filesystem name).
    pub source: String,
    /// Mount point, with the kernel's octal escapes decoded.
    pub target: PathBuf,
    /// Filesystem type, e.g. `cgroup2` or `bpf`.
    pub fstype: String,
}

/// True when the effective user is root (the kernel suite needs `CAP_BPF`, `CAP_NET_ADMIN` and
/// `CAP_SYS_ADMIN`; root is the simple, checkable proxy).
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mounts").context("failed to read /proc/self/mounts")?;
    Ok(parse_mounts(&text))
}

/// Parses the text of `/proc/self/mounts`; malformed lines are skipped.
#[must_use]
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some(Mount {
                source: unescape_mount_field(source),
                target: PathBuf::from(unescape_mount_field(target)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// Decodes the `\ooo` octal escapes the kernel uses for space, tab, newline and backslash.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..=i + 3]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mounts` (on a hybrid host it is
/// not `/sys/fs/cgroup`, so it is never assumed).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = mounts()?;
    match mounts.into_iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => Ok(m.target),
        None => bail!(
            "no cgroup2 filesystem in /proc/self/mounts; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        ),
    }
}

/// Makes sure bpffs is mounted at [`BPFFS_DIR`] (mounting it if no `bpf` mount is there) and
/// returns that path.
pub fn ensure_bpffs() -> Result<PathBuf> {
    // Two test threads racing to mount would stack two bpffs instances; serialize the check.
    static MOUNT_LOCK: Mutex<()> = Mutex::new(());
    let _guard = MOUNT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Path::new(BPFFS_DIR);
    if mounts()?
        .iter()
        .any(|m| m.fstype == "bpf" && m.target == dir)
    {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("failed to mount bpffs at {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// The Cargo workspace root (the parent of this crate's manifest directory).
#[must_use]
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mounts_and_escapes() {
        let text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                    bpf /sys/fs/bpf bpf rw 0 0\n\
                    tmpfs /mnt/with\\040space tmpfs rw 0 0\n";
        let m = parse_mounts(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!(m[0].target, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[2].target, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn finds_a_cgroup2_mount() {
        // Every supported host has one; the path itself is never assumed.
        let root = cgroup2_root().expect("cgroup2 mount");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
