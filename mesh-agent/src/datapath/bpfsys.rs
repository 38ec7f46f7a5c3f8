//! Raw `bpf(2)` queries that aya 0.14 keeps private or lacks: programs attached to a cgroup,
//! program/link/map info by fd or id, forced link detach, and a tiny program loader for probes.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

/// `bpf(2)` commands (uapi `enum bpf_cmd`), not exported by libc.
mod cmd {
    pub const PROG_LOAD: libc::c_long = 5;
    pub const OBJ_GET: libc::c_long = 7;
    pub const PROG_GET_NEXT_ID: libc::c_long = 11;
    pub const MAP_GET_NEXT_ID: libc::c_long = 12;
    pub const PROG_GET_FD_BY_ID: libc::c_long = 13;
    pub const MAP_GET_FD_BY_ID: libc::c_long = 14;
    pub const OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    pub const PROG_QUERY: libc::c_long = 16;
    pub const LINK_CREATE: libc::c_long = 28;
    pub const LINK_GET_FD_BY_ID: libc::c_long = 30;
    pub const LINK_GET_NEXT_ID: libc::c_long = 31;
    pub const LINK_DETACH: libc::c_long = 34;
}

/// uapi `enum bpf_prog_type` values this crate names.
pub mod prog_type {
    pub const SOCKET_FILTER: u32 = 1;
    pub const CGROUP_SOCK: u32 = 9;
    pub const SOCK_OPS: u32 = 13;
    pub const SK_MSG: u32 = 16;
    pub const CGROUP_SOCK_ADDR: u32 = 18;
    pub const TRACING: u32 = 26;
}

/// uapi `enum bpf_link_type` values this crate names.
pub mod link_type {
    pub const CGROUP: u32 = 3;
}

/// uapi `enum bpf_attach_type`: the cgroup hooks that see or rewrite a socket's addresses (the
/// socket load balancers of Cilium and Calico use these), with bpftool's names.
pub const SOCKET_HOOKS: [(u32, &str); 15] = [
    (3, "sock_ops"),
    (8, "bind4"),
    (9, "bind6"),
    (10, "connect4"),
    (11, "connect6"),
    (12, "post_bind4"),
    (13, "post_bind6"),
    (14, "sendmsg4"),
    (15, "sendmsg6"),
    (19, "recvmsg4"),
    (20, "recvmsg6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (31, "getsockname4"),
    (32, "getsockname6"),
];

/// `BPF_F_QUERY_EFFECTIVE`: programs that run for the cgroup, inherited ones included.
const QUERY_EFFECTIVE: u32 = 1;

/// bpftool's name of an attach type.
#[must_use]
pub fn attach_type_name(attach_type: u32) -> &'static str {
    SOCKET_HOOKS
        .iter()
        .find(|(t, _)| *t == attach_type)
        .map_or("other", |(_, n)| n)
}

/// bpftool's name of a program type.
#[must_use]
pub fn prog_type_name(ty: u32) -> &'static str {
    match ty {
        prog_type::SOCKET_FILTER => "socket_filter",
        prog_type::CGROUP_SOCK => "cgroup_sock",
        prog_type::SOCK_OPS => "sock_ops",
        prog_type::SK_MSG => "sk_msg",
        prog_type::CGROUP_SOCK_ADDR => "cgroup_sock_addr",
        prog_type::TRACING => "tracing",
        _ => "other",
    }
}

/// `bpf(cmd, attr, size_of(attr))`, returning the non-negative result or errno.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: every caller passes a `#[repr(C)]` prefix of `union bpf_attr` for `cmd` that lives
    // across the call; the kernel reads and writes at most `size_of::<T>()` bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(fd: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `BPF_OBJ_GET` on a pinned object (program, map or link); returns its fd.
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel rejects non-zero bytes past the last field it knows.
        pad: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    sys_bpf(cmd::OBJ_GET, &mut attr).map(owned_fd)
}

/// Ids of the programs attached to `cgroup` at `attach_type`; `effective` adds those inherited
/// from ancestor cgroups (what actually runs for the cgroup's sockets).
pub fn prog_query(
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    effective: bool,
) -> std::io::Result<Vec<u32>> {
    // Field names are the uapi's (`query.query_flags`), kept so the layout reads against it.
    #[repr(C)]
    #[expect(clippy::struct_field_names, reason = "uapi field names")]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        pad: u32,
    }
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = Query {
            target_fd: cgroup.as_raw_fd().cast_unsigned(),
            attach_type,
            query_flags: if effective { QUERY_EFFECTIVE } else { 0 },
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            pad: 0,
        };
        match sys_bpf(cmd::PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel wrote the count; retry with that much room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0u32; attr.prog_cnt as usize + 16];
            }
            Err(e) => return Err(e),
        }
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` into the prefix `T` of the object's info struct.
fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = GetInfo {
        bpf_fd: fd.as_raw_fd().cast_unsigned(),
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    sys_bpf(cmd::OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// What identifies a loaded program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub prog_type: u32,
    /// The object name (at most 15 bytes: the kernel truncates).
    pub name: String,
}

/// Info of the program behind `fd`.
pub fn prog_info(fd: BorrowedFd<'_>) -> std::io::Result<ProgInfo> {
    // The prefix of uapi `struct bpf_prog_info` up to `name`.
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
        jited_prog_insns: u64,
        xlated_prog_insns: u64,
        load_time: u64,
        created_by_uid: u32,
        nr_map_ids: u32,
        map_ids: u64,
        name: [u8; 16],
    }
    let mut info = Info::default();
    info_by_fd(fd, &mut info)?;
    let len = info.name.iter().position(|b| *b == 0).unwrap_or(16);
    Ok(ProgInfo {
        id: info.id,
        prog_type: info.prog_type,
        name: String::from_utf8_lossy(&info.name[..len]).into_owned(),
    })
}

/// What identifies a link and what it attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub link_type: u32,
    pub prog_id: u32,
    /// Cgroup links only (0 otherwise).
    pub cgroup_id: u64,
    /// Cgroup links only.
    pub attach_type: u32,
}

/// Info of the link behind `fd`.
pub fn link_info(fd: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    // The prefix of uapi `struct bpf_link_info` with its `cgroup` union member.
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        link_type: u32,
        id: u32,
        prog_id: u32,
        pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        pad2: u32,
    }
    let mut info = Info::default();
    info_by_fd(fd, &mut info)?;
    let cgroup = info.link_type == link_type::CGROUP;
    Ok(LinkInfo {
        id: info.id,
        link_type: info.link_type,
        prog_id: info.prog_id,
        cgroup_id: if cgroup { info.cgroup_id } else { 0 },
        attach_type: if cgroup { info.attach_type } else { 0 },
    })
}

/// Id of the map behind `fd`.
pub fn map_id(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        map_type: u32,
        id: u32,
    }
    let mut info = Info::default();
    info_by_fd(fd, &mut info)?;
    Ok(info.id)
}

#[repr(C)]
struct ById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> std::io::Result<OwnedFd> {
    let mut attr = ById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    sys_bpf(cmd, &mut attr).map(owned_fd)
}

/// An fd of the program with this id (`ENOENT` once it is gone).
pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    fd_by_id(cmd::PROG_GET_FD_BY_ID, id)
}

/// An fd of the map with this id (`ENOENT` once it is gone).
pub fn map_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    fd_by_id(cmd::MAP_GET_FD_BY_ID, id)
}

/// An fd of the link with this id (`ENOENT` once it is gone).
pub fn link_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    fd_by_id(cmd::LINK_GET_FD_BY_ID, id)
}

fn ids(cmd: libc::c_long) -> std::io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let mut attr = ById {
            id: start,
            next_id: 0,
            open_flags: 0,
        };
        match sys_bpf(cmd, &mut attr) {
            Ok(_) => {
                out.push(attr.next_id);
                start = attr.next_id;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Ids of every link in the system.
pub fn link_ids() -> std::io::Result<Vec<u32>> {
    ids(cmd::LINK_GET_NEXT_ID)
}

/// Ids of every program in the system.
pub fn prog_ids() -> std::io::Result<Vec<u32>> {
    ids(cmd::PROG_GET_NEXT_ID)
}

/// Ids of every map in the system.
pub fn map_ids() -> std::io::Result<Vec<u32>> {
    ids(cmd::MAP_GET_NEXT_ID)
}

/// `BPF_LINK_DETACH`: detaches a link now, even while pins or fds still hold it (the link
/// object stays, defunct, until its last reference goes).
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct Detach {
        link_fd: u32,
    }
    let mut attr = Detach {
        link_fd: link.as_raw_fd().cast_unsigned(),
    };
    sys_bpf(cmd::LINK_DETACH, &mut attr).map(|_| ())
}

/// The `bpf_attr` prefix of `BPF_LINK_CREATE` this module uses.
#[repr(C)]
struct Create {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `BPF_LINK_CREATE` exists (Linux 5.7): with an invalid program fd the kernel answers `EBADF`
/// when it knows the command and `EINVAL` when it does not.
#[must_use]
pub fn link_create_supported() -> bool {
    let mut attr = Create {
        prog_fd: u32::MAX,
        target_fd: u32::MAX,
        attach_type: 10,
        flags: 0,
    };
    matches!(sys_bpf(cmd::LINK_CREATE, &mut attr), Err(e) if e.raw_os_error() == Some(libc::EBADF))
}

/// One eBPF instruction (uapi `struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    pub code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// An instruction from its fields.
    #[must_use]
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }

    /// `r0 = imm`.
    #[must_use]
    pub const fn mov_r0(imm: i32) -> Self {
        // BPF_ALU64 | BPF_MOV | BPF_K
        Self {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm,
        }
    }

    /// `exit`.
    #[must_use]
    pub const fn exit() -> Self {
        // BPF_JMP | BPF_EXIT
        Self {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

/// Loads a (tiny) program; returns its fd, or the error with the verifier's log.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[Insn],
) -> Result<OwnedFd, (std::io::Error, String)> {
    #[repr(C)]
    struct Load {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = Load {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    sys_bpf(cmd::PROG_LOAD, &mut attr)
        .map(owned_fd)
        .map_err(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            (e, String::from_utf8_lossy(&log[..end]).trim().to_owned())
        })
}

/// Attaches `prog` to `cgroup` through a new cgroup link (`BPF_LINK_CREATE`); the link lives as
/// long as the returned fd (or a pin of it).
pub fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = Create {
        prog_fd: prog.as_raw_fd().cast_unsigned(),
        target_fd: cgroup.as_raw_fd().cast_unsigned(),
        attach_type,
        flags: 0,
    };
    sys_bpf(cmd::LINK_CREATE, &mut attr).map(owned_fd)
}

/// The cgroup id of a cgroup v2 directory: on cgroup2 (kernfs) the inode number is the id that
/// link info reports.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir).map(|m| m.ino())
}
