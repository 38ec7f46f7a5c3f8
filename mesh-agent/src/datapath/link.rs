//! Pinned cgroup links: attach once, survive agent restarts, and swap the program in place on
//! upgrade (`BPF_LINK_UPDATE`), so connections never see a moment without the data path.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

/// `bpf(2)` commands (uapi `enum bpf_cmd`), not exported by libc.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_OBJ_GET` on a pinned object; returns its fd.
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
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
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_OBJ_GET that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of the pinned link at `pin` with `prog_fd`, atomically.
pub fn update_pinned(pin: &Path, prog_fd: i32) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = obj_get(pin)?;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd().cast_unsigned(),
        new_prog_fd: prog_fd.cast_unsigned(),
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_LINK_UPDATE that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            size_of::<LinkUpdate>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
