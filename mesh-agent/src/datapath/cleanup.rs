//! `mesh-agent cleanup`: removes every program, link, map and pin the agent made, so the node
//! behaves as if the mesh had never run (uninstall).
//!
//! What the agent leaves in the kernel is held by pins only: cgroup links and the reset
//! tracepoint link under `<pin-dir>/links`, maps under `<pin-dir>/maps` (the `sk_msg` program is
//! held by the pinned sockhash and released with it — sockmaps drop their programs when the last
//! user reference goes). Unpinning releases them. A link of ours that something else still holds
//! open (or that lost its pin) is detached by force (`BPF_LINK_DETACH`), found by walking every
//! link of the node's cgroup and matching our program names. kube-proxy's `--cleanup` and
//! Cilium's `cilium-dbg cleanup` do the same job for iptables rules and Cilium's pins.

use std::{
    collections::BTreeSet,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use super::{CGROUP_PROGRAMS, SK_MSG_PROGRAM, TRACEPOINTS, bpfsys};

/// What to clean.
#[derive(Clone, Debug)]
pub struct CleanupConfig {
    /// bpffs directory the agent pinned into (`maps/`, `links/`).
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the agent attached to.
    pub cgroup: PathBuf,
    /// The agent's admin socket: alive means an agent runs and owns the pins.
    pub admin_socket: PathBuf,
}

/// Why cleanup refused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "refusing to clean up: an agent is running (its admin socket `{}` answers); stop it first (kubectl delete daemonset mesh-agent, or systemctl stop)",
        socket.display()
    )]
    AgentRunning { socket: PathBuf },
    #[error(
        "refusing to clean up `{}`: it is not a mesh pin directory (it holds `{entry}`, which the agent never creates); pass the agent's --pin-dir",
        pin_dir.display()
    )]
    NotOurs { pin_dir: PathBuf, entry: String },
    #[error("failed to {op} `{}`: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What cleanup removed, one human-readable line per object.
#[derive(Clone, Debug, Default)]
pub struct CleanupReport {
    pub removed: Vec<String>,
}

/// The names the kernel keeps for our programs (`BPF_OBJ_NAME_LEN` is 16 with the NUL).
fn our_program_names() -> BTreeSet<String> {
    CGROUP_PROGRAMS
        .iter()
        .chain([&SK_MSG_PROGRAM])
        .chain(TRACEPOINTS.iter().map(|(name, _)| name))
        .map(|n| n.chars().take(15).collect())
        .collect()
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CleanupError {
    let path = path.to_owned();
    move |source| CleanupError::Io { op, path, source }
}

/// Removes everything the agent made under `cfg.pin_dir` and on `cfg.cgroup`. Idempotent: a
/// second run finds nothing and succeeds.
pub fn cleanup(cfg: &CleanupConfig) -> Result<CleanupReport, CleanupError> {
    if std::os::unix::net::UnixStream::connect(&cfg.admin_socket).is_ok() {
        return Err(CleanupError::AgentRunning {
            socket: cfg.admin_socket.clone(),
        });
    }
    check_pin_dir(&cfg.pin_dir)?;
    let mut report = CleanupReport::default();
    unpin_links(&cfg.pin_dir.join("links"), &mut report)?;
    detach_leftover_links(&cfg.cgroup, &mut report)?;
    unpin_maps(&cfg.pin_dir.join("maps"), &mut report)?;
    for dir in [
        cfg.pin_dir.join("links"),
        cfg.pin_dir.join("maps"),
        cfg.pin_dir.clone(),
    ] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => report
                .removed
                .push(format!("pin directory {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove pin directory", &dir)(e)),
        }
    }
    // The socket file of an agent that was killed (nothing answers on it any more).
    if std::fs::remove_file(&cfg.admin_socket).is_ok() {
        report
            .removed
            .push(format!("stale admin socket {}", cfg.admin_socket.display()));
    }
    Ok(report)
}

/// The pin directory holds only what the agent makes (`links/`, `maps/`): never wipe a
/// directory that someone pointed at by mistake (`/sys/fs/bpf` itself, Cilium's `tc/globals`).
fn check_pin_dir(pin_dir: &Path) -> Result<(), CleanupError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read pin directory", pin_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("read pin directory", pin_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "links" && name != "maps" {
            return Err(CleanupError::NotOurs {
                pin_dir: pin_dir.to_owned(),
                entry: name,
            });
        }
    }
    Ok(())
}

fn pins(dir: &Path) -> Result<Vec<PathBuf>, CleanupError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut out: Vec<PathBuf> = entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(io_err("read pin directory", dir))?;
            out.sort();
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("read pin directory", dir)(e)),
    }
}

/// Unpins each link; the pin was its last reference, so the kernel detaches it.
fn unpin_links(dir: &Path, report: &mut CleanupReport) -> Result<(), CleanupError> {
    for pin in pins(dir)? {
        let what = bpfsys::obj_get(&pin)
            .and_then(|fd| bpfsys::link_info(fd.as_fd()))
            .map_or_else(
                |_| String::new(),
                |l| {
                    let hook = if l.link_type == bpfsys::link_type::CGROUP {
                        bpfsys::attach_type_name(l.attach_type)
                    } else {
                        "tracing"
                    };
                    format!(" (link id {}, program id {}, {hook})", l.id, l.prog_id)
                },
            );
        std::fs::remove_file(&pin).map_err(io_err("unpin link", &pin))?;
        report.removed.push(format!("link {}{what}", pin.display()));
    }
    Ok(())
}

/// Detaches links of ours still attached to the cgroup after unpinning (held open elsewhere, or
/// their pin was deleted by hand), and legacy attachments of our programs.
fn detach_leftover_links(cgroup: &Path, report: &mut CleanupReport) -> Result<(), CleanupError> {
    let cgroup_id = match bpfsys::cgroup_id(cgroup) {
        Ok(id) => id,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat cgroup", cgroup)(e)),
    };
    let ours = our_program_names();
    let is_ours = |prog_id: u32| {
        bpfsys::prog_fd_by_id(prog_id)
            .and_then(|fd| bpfsys::prog_info(fd.as_fd()))
            .is_ok_and(|p| ours.contains(&p.name))
    };
    let ids = bpfsys::link_ids().map_err(io_err("list links (BPF_LINK_GET_NEXT_ID)", cgroup))?;
    for id in ids {
        // Links that vanish while we walk are already gone: nothing to do.
        let Ok(fd) = bpfsys::link_fd_by_id(id) else {
            continue;
        };
        let Ok(info) = bpfsys::link_info(fd.as_fd()) else {
            continue;
        };
        if info.link_type != bpfsys::link_type::CGROUP
            || info.cgroup_id != cgroup_id
            || info.prog_id == 0
            || !is_ours(info.prog_id)
        {
            continue;
        }
        bpfsys::link_detach(fd.as_fd())
            .map_err(io_err("detach link (BPF_LINK_DETACH) on", cgroup))?;
        report.removed.push(format!(
            "link id {} (program id {}, {}) detached from {}",
            info.id,
            info.prog_id,
            bpfsys::attach_type_name(info.attach_type),
            cgroup.display()
        ));
    }
    Ok(())
}

/// Unpins each map; programs that used it are gone, so the kernel frees it.
fn unpin_maps(dir: &Path, report: &mut CleanupReport) -> Result<(), CleanupError> {
    for pin in pins(dir)? {
        let id = bpfsys::obj_get(&pin)
            .and_then(|fd| bpfsys::map_id(fd.as_fd()))
            .map_or_else(|_| String::new(), |id| format!(" (map id {id})"));
        std::fs::remove_file(&pin).map_err(io_err("unpin map", &pin))?;
        report.removed.push(format!("map {}{id}", pin.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_are_truncated_as_the_kernel_keeps_them() {
        let names = our_program_names();
        assert!(names.contains("mesh_connect4"));
        assert!(names.contains("mesh_getpeernam"), "{names:?}");
        assert!(names.contains("mesh_tcp_receiv"), "{names:?}");
        assert!(names.iter().all(|n| n.len() <= 15));
    }

    #[test]
    fn a_missing_pin_directory_is_clean_and_a_foreign_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("mesh-cleanup-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = CleanupConfig {
            pin_dir: dir.join("pins"),
            cgroup: dir.join("no-cgroup"),
            admin_socket: dir.join("admin.sock"),
        };
        let report = cleanup(&cfg).unwrap();
        assert!(report.removed.is_empty(), "{report:?}");

        std::fs::create_dir_all(cfg.pin_dir.join("tc")).unwrap();
        let e = cleanup(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("not a mesh pin directory") && e.contains("`tc`"),
            "{e}"
        );
        assert!(
            cfg.pin_dir.join("tc").exists(),
            "nothing of a foreign dir is removed"
        );

        std::fs::remove_dir(cfg.pin_dir.join("tc")).unwrap();
        std::fs::create_dir_all(cfg.pin_dir.join("links")).unwrap();
        let report = cleanup(&cfg).unwrap();
        assert_eq!(report.removed.len(), 2, "{report:?}");
        assert!(!cfg.pin_dir.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_live_admin_socket_refuses() {
        let dir = std::env::temp_dir().join(format!("mesh-cleanup-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("admin.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let cfg = CleanupConfig {
            pin_dir: dir.join("pins"),
            cgroup: dir.clone(),
            admin_socket: socket,
        };
        let e = cleanup(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("refusing to clean up: an agent is running"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
