//! Refuses to share the cgroup's socket hooks with another socket load balancer (Cilium's or
//! Calico's `connect4`/`sendmsg4`/…) unless told to coexist.
//!
//! Two programs rewriting the same `connect()` make the result depend on their order (Cilium's
//! socket LB would translate a VIP before ours ever sees it, or ours would hand Cilium a backend
//! address it then leaves alone): the failure shows as traffic that silently bypasses one mesh.
//! Checking at start turns that into one line naming the other programs; `--coexist` is for
//! operators who know the order is harmless (e.g. a program that only observes).

use std::{
    collections::BTreeSet,
    fmt,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use super::bpfsys;

/// A program on the cgroup's socket hooks that is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignProgram {
    pub id: u32,
    pub name: String,
    pub prog_type: u32,
    /// bpftool's name of the hook (`connect4`, `sock_ops`, …).
    pub hook: &'static str,
}

impl fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} id {} `{}` ({})",
            self.hook,
            self.id,
            self.name,
            bpfsys::prog_type_name(self.prog_type)
        )
    }
}

/// Why the check could not run, or why it refuses.
#[derive(Debug, thiserror::Error)]
pub enum CoexistError {
    #[error("failed to {op} `{}`: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to start: cgroup `{}` already has socket programs the mesh did not attach: {}; another socket load balancer (Cilium, Calico) would rewrite the same connect() calls — remove it, or pass --coexist to run beside it",
        cgroup.display(),
        list(.programs)
    )]
    Foreign {
        cgroup: PathBuf,
        programs: Vec<ForeignProgram>,
    },
}

fn list(programs: &[ForeignProgram]) -> String {
    programs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ids of the programs behind the links pinned under `<pin_dir>/links` (our own attachments,
/// left by an earlier agent: a restart adopts them).
pub fn own_program_ids(pin_dir: &Path) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| bpfsys::obj_get(&e.path()).ok())
        .filter_map(|fd| bpfsys::link_info(fd.as_fd()).ok())
        .map(|l| l.prog_id)
        .collect()
}

/// Every program that runs on `cgroup`'s socket hooks (inherited from ancestors included) and is
/// not behind one of our pinned links.
pub fn foreign_programs(
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<Vec<ForeignProgram>, CoexistError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| CoexistError::Io { op, path, source }
    };
    let dir = std::fs::File::open(cgroup).map_err(io("open cgroup", cgroup))?;
    let ours = own_program_ids(pin_dir);
    let mut out = Vec::new();
    for (attach_type, hook) in bpfsys::SOCKET_HOOKS {
        let ids = bpfsys::prog_query(dir.as_fd(), attach_type, true).map_err(io(
            "query attached programs (BPF_PROG_QUERY) of cgroup",
            cgroup,
        ))?;
        for id in ids.into_iter().filter(|id| !ours.contains(id)) {
            // A program that went away between the query and now is no conflict.
            let Ok(fd) = bpfsys::prog_fd_by_id(id) else {
                continue;
            };
            let info = bpfsys::prog_info(fd.as_fd()).map_err(io("read program info", cgroup))?;
            out.push(ForeignProgram {
                id,
                name: info.name,
                prog_type: info.prog_type,
                hook,
            });
        }
    }
    Ok(out)
}

/// Fails with one line naming every foreign program on `cgroup`'s socket hooks.
pub fn refuse_foreign(cgroup: &Path, pin_dir: &Path) -> Result<(), CoexistError> {
    let programs = foreign_programs(cgroup, pin_dir)?;
    if programs.is_empty() {
        return Ok(());
    }
    Err(CoexistError::Foreign {
        cgroup: cgroup.to_owned(),
        programs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_line_naming_each_program() {
        let e = CoexistError::Foreign {
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            programs: vec![
                ForeignProgram {
                    id: 42,
                    name: "cil_sock4_conne".into(),
                    prog_type: bpfsys::prog_type::CGROUP_SOCK_ADDR,
                    hook: "connect4",
                },
                ForeignProgram {
                    id: 43,
                    name: "calico_connect_".into(),
                    prog_type: bpfsys::prog_type::CGROUP_SOCK_ADDR,
                    hook: "connect6",
                },
            ],
        };
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("connect4 id 42 `cil_sock4_conne` (cgroup_sock_addr)"),
            "{line}"
        );
        assert!(line.contains("connect6 id 43"), "{line}");
        assert!(line.contains("--coexist"), "{line}");
        assert!(line.contains("`/sys/fs/cgroup`"), "{line}");
    }
}
