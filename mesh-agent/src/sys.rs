//! Facts about the host the agent needs: where cgroup v2 and bpffs are mounted.

use std::path::PathBuf;

/// Mount point of the filesystem of type `fstype`, read from `/proc/self/mounts`.
pub fn mount_point(fstype: &str) -> std::io::Result<Option<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    }))
}

/// The cgroup v2 mount point (never assume it: it is `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    mount_point("cgroup2")?.ok_or_else(|| std::io::Error::other("no cgroup2 filesystem is mounted"))
}
