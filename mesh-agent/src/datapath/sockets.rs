//! Ends connected UDP sockets that our connect program translated to a backend since removed:
//! netlink `sock_diag` (`SOCK_DESTROY`) in every network namespace of the node, as Cilium does.
//!
//! kube-proxy deletes the conntrack entries of a removed UDP endpoint so the next datagram is
//! balanced again; with socket-level translation there is no conntrack entry, the socket itself
//! holds the backend's address, so the socket has to go. Cilium destroys such sockets
//! (`bpf_sock_destroy` from an `iter/udp` program since Linux 6.5, netlink `SOCK_DESTROY` before).
//! The kernel's `udp_abort` sets `ECONNABORTED` on the socket and disconnects it: the
//! application's next `recv` fails with `ECONNABORTED`, its next `send` with `EDESTADDRREQ` (the
//! socket has no destination any more; measured on 6.18 by `tests/tests/udp_sockets.rs`), and a
//! new socket is balanced over the current backends.
//!
//! Which sockets: the connect program records every UDP translation in `REVNAT` under the
//! socket's cookie and the backend's address (the reverse translation its replies need), and a
//! `sock_diag` dump names each connected UDP socket by its cookie and peer. A socket is destroyed
//! only when it is connected to a removed backend's address and port **and** `REVNAT` holds,
//! under its cookie and that address, the removed backend's service. A socket connected to the pod
//! address directly has no such entry and is never touched. (`sock_diag` could return the
//! `SOCK_STATE` socket storage instead, but `inet_sk_diag_fill` skips socket storage for sockets
//! without a connection sock, i.e. for every UDP socket.)

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use mesh_common::{AddrBe, FAMILY_V4, FAMILY_V6};

/// Where `ip netns` and the container runtimes (containerd's CRI plugin, CRI-O) bind-mount the
/// network namespaces of pod sandboxes.
pub const NETNS_DIR: &str = "/run/netns";

/// A backend taken out of a UDP service, whose translated sockets must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    pub backend_id: u32,
    /// The backend's address in its service's family, as `REVNAT` keys it.
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub family: u8,
    /// The service it left: what `REVNAT` holds for a socket translated to it.
    pub svc_addr_be: AddrBe,
    pub svc_port_be: u16,
}

/// `REVNAT`'s service address and port for (socket cookie, backend address, backend port).
pub type RevNatLookup<'a> = &'a (dyn Fn(u64, AddrBe, u16) -> Option<(AddrBe, u16)> + Sync);

/// What one sweep did.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Network namespaces looked at.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: u64,
    /// Sockets that matched but could not be destroyed, and namespaces that could not be dumped.
    pub failed: u64,
    /// Why, one line each (logged by the caller).
    pub errors: Vec<SocketsError>,
}

/// What went wrong finding or ending sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("failed to {op} network namespace `{}`: {source}", path.display())]
    Netns {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sock_diag {op} in network namespace `{}` failed: {source}", path.display())]
    Netlink {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sock_diag reply in network namespace `{}` is malformed: {reason}", path.display())]
    Malformed { path: PathBuf, reason: &'static str },
    #[error("failed to destroy UDP socket {local} -> {peer} (cookie {cookie:#x}) in network namespace `{}`: {source}", path.display())]
    Destroy {
        path: PathBuf,
        local: SocketAddr,
        peer: SocketAddr,
        cookie: u64,
        source: io::Error,
    },
}

/// Every network namespace a translated socket can live in, each once (by device and inode):
/// those of the processes in `cgroup` and its descendants (the programs run only for them; on a
/// node whose agent sees the host's process ids), and the pod sandboxes' bind mounts in
/// `netns_dir` (what a containerised agent without the host's process ids still sees).
#[must_use]
pub fn namespaces(cgroup: &Path, netns_dir: &Path) -> Vec<(PathBuf, File)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        // A process that exited or a mount that went away in between is simply not there.
        let Ok(f) = File::open(&path) else { return };
        let Ok(meta) = f.metadata() else { return };
        if seen.insert((
            std::os::unix::fs::MetadataExt::dev(&meta),
            std::os::unix::fs::MetadataExt::ino(&meta),
        )) {
            out.push((path, f));
        }
    };
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                // 0: a process of another pid namespace, invisible here.
                if pid != 0 {
                    add(PathBuf::from(format!("/proc/{pid}/ns/net")));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir(netns_dir) {
        for e in entries.flatten() {
            add(e.path());
        }
    }
    out
}

/// Destroys, in each of `namespaces`, every connected UDP socket that `revnat` shows was
/// translated to one of `stale` (see the module doc).
///
/// Runs on a thread of its own that enters each namespace in turn (`setns` changes only the
/// calling thread, and that thread ends with the sweep), so the caller's namespace never changes.
#[must_use]
pub fn sweep(
    revnat: RevNatLookup<'_>,
    stale: &[Stale],
    namespaces: &[(PathBuf, File)],
) -> SweepReport {
    let mut by_addr: HashMap<(AddrBe, u16), Vec<Stale>> = HashMap::new();
    for s in stale {
        by_addr.entry((s.addr_be, s.port_be)).or_default().push(*s);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut report = SweepReport {
                    namespaces: namespaces.len(),
                    ..SweepReport::default()
                };
                for (path, ns) in namespaces {
                    // SAFETY: `ns` is an open nsfs file; setns only reads the descriptor.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        report.failed += 1;
                        report.errors.push(SocketsError::Netns {
                            op: "enter",
                            path: path.clone(),
                            source: io::Error::last_os_error(),
                        });
                        continue;
                    }
                    sweep_here(path, revnat, &by_addr, &mut report);
                }
                report
            })
            .join()
            .unwrap_or_else(|_| SweepReport {
                failed: 1,
                ..SweepReport::default()
            })
    })
}

/// One namespace (the calling thread's), both families.
fn sweep_here(
    path: &Path,
    revnat: RevNatLookup<'_>,
    stale: &HashMap<(AddrBe, u16), Vec<Stale>>,
    report: &mut SweepReport,
) {
    let sock = match DiagSocket::open() {
        Ok(s) => s,
        Err(source) => {
            report.failed += 1;
            report.errors.push(SocketsError::Netlink {
                op: "socket",
                path: path.to_path_buf(),
                source,
            });
            return;
        }
    };
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let sockets = match sock.dump(family, path) {
            Ok(s) => s,
            Err(e) => {
                report.failed += 1;
                report.errors.push(e);
                continue;
            }
        };
        for s in sockets.iter().filter(|s| s.is_translated_to(stale, revnat)) {
            match sock.destroy(family, &s.id_raw) {
                Ok(()) => report.destroyed += 1,
                // Closed by the application between the dump and now: nothing left to end.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    report.failed += 1;
                    report.errors.push(SocketsError::Destroy {
                        path: path.to_path_buf(),
                        local: s.local,
                        peer: s.peer,
                        cookie: s.cookie,
                        source,
                    });
                }
            }
        }
    }
}

// Netlink and sock_diag constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const STATE_ESTABLISHED: u8 = 1;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// One connected UDP socket of a dump.
#[derive(Debug)]
struct Dumped {
    /// `inet_diag_sockid` as the kernel sent it: the destroy request names the socket with it.
    id_raw: [u8; SOCKID_LEN],
    local: SocketAddr,
    peer: SocketAddr,
    cookie: u64,
}

impl Dumped {
    /// True when the socket is connected to a removed backend and our connect program translated
    /// it there from that backend's service.
    fn is_translated_to(
        &self,
        stale: &HashMap<(AddrBe, u16), Vec<Stale>>,
        revnat: RevNatLookup<'_>,
    ) -> bool {
        let (family, addr_be) = addr_be_of(self.peer.ip());
        let port_be = self.peer.port().to_be();
        let Some(candidates) = stale.get(&(addr_be, port_be)) else {
            return false;
        };
        let Some(svc) = revnat(self.cookie, addr_be, port_be) else {
            return false;
        };
        candidates
            .iter()
            .any(|s| s.family == family && (s.svc_addr_be, s.svc_port_be) == svc)
    }
}

/// An address as the kernel maps hold it; an IPv4-mapped IPv6 address is the IPv4 one (that is
/// how `SockState` records a dual-stack socket's backend).
fn addr_be_of(ip: IpAddr) -> (u8, AddrBe) {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    match ip {
        IpAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (FAMILY_V6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket in the namespace of the thread that opened it.
struct DiagSocket {
    fd: OwnedFd,
}

fn netlink_header(len: usize, kind: u16, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    b
}

/// `inet_diag_req_v2` for UDP sockets of `family` in `states`.
fn request_body(b: &mut Vec<u8>, family: u8, states: u32, id: &[u8; SOCKID_LEN]) {
    b.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(id);
}

/// The dump request: connected UDP sockets of `family`.
fn dump_request(family: u8) -> Vec<u8> {
    let mut b = netlink_header(
        NLMSG_HDR + REQ_LEN,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
    );
    request_body(&mut b, family, 1 << STATE_ESTABLISHED, &[0; SOCKID_LEN]);
    b
}

fn destroy_request(family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut b = netlink_header(NLMSG_HDR + REQ_LEN, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK);
    request_body(&mut b, family, u32::MAX, id);
    b
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes one `inet_diag_msg` (with its attributes) of a dump.
fn parse_message(msg: &[u8]) -> Option<Dumped> {
    if msg.len() < MSG_LEN {
        return None;
    }
    let family = msg[0];
    let state = msg[1];
    if state != STATE_ESTABLISHED {
        return None;
    }
    let mut id_raw = [0u8; SOCKID_LEN];
    id_raw.copy_from_slice(&msg[4..4 + SOCKID_LEN]);
    let sport = u16::from_be_bytes([id_raw[0], id_raw[1]]);
    let dport = u16::from_be_bytes([id_raw[2], id_raw[3]]);
    let ip = |at: usize| -> IpAddr {
        if i32::from(family) == libc::AF_INET {
            Ipv4Addr::new(id_raw[at], id_raw[at + 1], id_raw[at + 2], id_raw[at + 3]).into()
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&id_raw[at..at + 16]);
            Ipv6Addr::from(o).into()
        }
    };
    let cookie = u64::from(u32_at(&id_raw, 40)) | (u64::from(u32_at(&id_raw, 44)) << 32);
    Some(Dumped {
        local: SocketAddr::new(ip(4), sport),
        peer: SocketAddr::new(ip(20), dport),
        cookie,
        id_raw,
    })
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A dump that does not answer within this would stall the data-path owner.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: `tv` outlives the call; the length is its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is a valid buffer of its length; the kernel is the default destination.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.cast_unsigned())
    }

    /// Connected UDP sockets of `family` in this namespace.
    fn dump(&self, family: u8, path: &Path) -> Result<Vec<Dumped>, SocketsError> {
        let netlink = |op, source| SocketsError::Netlink {
            op,
            path: path.to_path_buf(),
            source,
        };
        let malformed = |reason| SocketsError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        self.send(&dump_request(family))
            .map_err(|e| netlink("dump request", e))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = self.recv(&mut buf).map_err(|e| netlink("dump", e))?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDR {
                let len = u32_at(rest, 0) as usize;
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(malformed("message length out of bounds"));
                }
                let body = &rest[NLMSG_HDR..len];
                match u16_at(rest, 4) {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = if body.len() >= 4 {
                            u32_at(body, 0).cast_signed()
                        } else {
                            0
                        };
                        return Err(netlink("dump", io::Error::from_raw_os_error(-errno)));
                    }
                    SOCK_DIAG_BY_FAMILY => out.extend(parse_message(body)),
                    _ => {}
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    /// Ends one socket (named by its dumped id, cookie included): the kernel's `udp_abort`.
    fn destroy(&self, family: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        self.send(&destroy_request(family, id))?;
        let mut buf = [0u8; 1024];
        let n = self.recv(&mut buf)?;
        if n >= NLMSG_HDR + 4 && u16_at(&buf, 4) == NLMSG_ERROR {
            let errno = u32_at(&buf, NLMSG_HDR).cast_signed();
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no acknowledgement for SOCK_DESTROY",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: [u8; 4] = [10, 96, 0, 10];

    fn v4(o: [u8; 4]) -> AddrBe {
        [u32::from_ne_bytes(o), 0, 0, 0]
    }

    fn stale() -> HashMap<(AddrBe, u16), Vec<Stale>> {
        let s = Stale {
            backend_id: 9,
            addr_be: v4([10, 0, 0, 7]),
            port_be: 53u16.to_be(),
            family: FAMILY_V4,
            svc_addr_be: v4(VIP),
            svc_port_be: 53u16.to_be(),
        };
        HashMap::from([((s.addr_be, s.port_be), vec![s])])
    }

    fn dumped(peer: &str, cookie: u64) -> Dumped {
        Dumped {
            id_raw: [0; SOCKID_LEN],
            local: "10.0.1.2:40000".parse().unwrap(),
            peer: peer.parse().unwrap(),
            cookie,
        }
    }

    /// `REVNAT` with one entry: socket 1 was translated from the VIP to 10.0.0.7:53; socket 2
    /// from another service to the same backend.
    fn revnat(cookie: u64, addr: AddrBe, port: u16) -> Option<(AddrBe, u16)> {
        let backend = (v4([10, 0, 0, 7]), 53u16.to_be());
        match cookie {
            1 if (addr, port) == backend => Some((v4(VIP), 53u16.to_be())),
            2 if (addr, port) == backend => Some((v4([10, 96, 0, 11]), 53u16.to_be())),
            _ => None,
        }
    }

    #[test]
    fn only_sockets_we_translated_to_the_removed_backend_match() {
        let s = stale();
        assert!(dumped("10.0.0.7:53", 1).is_translated_to(&s, &revnat));
        // Dual-stack socket: the kernel reports the IPv4-mapped peer.
        assert!(dumped("[::ffff:10.0.0.7]:53", 1).is_translated_to(&s, &revnat));
        // Connected straight to the pod address: no reverse translation of ours.
        assert!(!dumped("10.0.0.7:53", 3).is_translated_to(&s, &revnat));
        // Translated to the same backend by another service it still belongs to.
        assert!(!dumped("10.0.0.7:53", 2).is_translated_to(&s, &revnat));
        // Connected elsewhere.
        assert!(!dumped("10.0.0.8:53", 1).is_translated_to(&s, &revnat));
        assert!(!dumped("10.0.0.7:54", 1).is_translated_to(&s, &revnat));
    }

    /// A dump message as `inet_sk_diag_fill` builds it.
    fn message() -> Vec<u8> {
        let mut m = vec![libc::AF_INET as u8, STATE_ESTABLISHED, 0, 0];
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 0, 1, 2]);
        id[20..24].copy_from_slice(&[10, 0, 0, 7]);
        id[40..44].copy_from_slice(&0x1234u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&id);
        m.extend_from_slice(&[0; 20]);
        // An attribute (INET_DIAG_SHUTDOWN), ignored.
        m.extend_from_slice(&5u16.to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m
    }

    #[test]
    fn a_dump_message_yields_the_socket() {
        let d = parse_message(&message()).unwrap();
        assert_eq!(d.local, "10.0.1.2:40000".parse().unwrap());
        assert_eq!(d.peer, "10.0.0.7:53".parse().unwrap());
        assert_eq!(d.cookie, 0x1_0000_1234);
        assert_eq!(&d.id_raw[..], &message()[4..4 + SOCKID_LEN]);
        // Truncated messages are skipped, not read past their end.
        assert!(parse_message(&message()[..40]).is_none());
        // Unconnected sockets are not candidates.
        let mut m = message();
        m[1] = 7;
        assert!(parse_message(&m).is_none());
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let d = dump_request(libc::AF_INET as u8);
        assert_eq!(d.len(), 16 + 56);
        assert_eq!(u32_at(&d, 0) as usize, d.len());
        assert_eq!(u16_at(&d, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16_at(&d, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(d[17], libc::IPPROTO_UDP as u8);
        assert_eq!(u32_at(&d, 20), 1 << STATE_ESTABLISHED);
        let x = destroy_request(libc::AF_INET6 as u8, &[1; SOCKID_LEN]);
        assert_eq!(x.len(), 16 + 56);
        assert_eq!(u16_at(&x, 4), SOCK_DESTROY);
        assert_eq!(&x[24..], &[1; SOCKID_LEN]);
    }
}
