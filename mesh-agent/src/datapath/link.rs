//! Pinned cgroup links: attach once, survive agent restarts, and swap the program in place on
//! upgrade (`BPF_LINK_UPDATE`), so connections never see a moment without the data path.

use std::{os::fd::AsRawFd as _, path::Path};

/// `bpf(2)` commands (uapi `enum bpf_cmd`), not exported by libc.
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Replaces the program of the pinned link at `pin` with `prog_fd`, atomically.
pub fn update_pinned(pin: &Path, prog_fd: i32) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = super::bpfsys::obj_get(pin)?;
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
