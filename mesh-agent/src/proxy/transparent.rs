//! Connecting to a local pod with the remote caller's address as source (ztunnel's "original
//! source"), and the node routing that brings the pod's replies back to that socket.
//!
//! The socket: `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) lets it bind a non-local address — the caller
//! pod's ip, port 0 as ztunnel does, so the kernel picks a free port and two tunnels from the same
//! caller port never collide. Its SYN leaves through the pod's veth like any locally sent packet.
//!
//! The replies: the pod answers to the remote pod's address, which the node would forward to the
//! other node. We mark packets that belong to a local transparent socket and deliver marked
//! packets locally:
//! - `iptables -t mangle -A KERNMESH-HBONE -m socket --transparent -j MARK --set-xmark M/M`
//!   (jumped to from `PREROUTING`) — the socket match looks the packet up in the socket tables,
//!   so only replies to our transparent sockets are marked, never forwarded pod traffic;
//! - `ip rule add fwmark M/M lookup T` and `ip route add local 0.0.0.0/0 dev lo table T`.
//!
//! This is ztunnel's node-mode recipe (its `-m socket --transparent` mark and a local-route table).
//! It needs the `iptables` (nft backend here) and `ip` binaries; a tc program with
//! `bpf_skc_lookup_tcp` would avoid them but adds a program per pod veth.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::Command;

use tokio::net::{TcpSocket, TcpStream};

/// The packet mark of replies to transparent sockets (ztunnel uses 0x111/0xfff for its own; we
/// take a bit of our own).
pub const REPLY_MARK: u32 = 0x0040_0000;
/// The routing table that delivers marked packets locally.
pub const REPLY_TABLE: u32 = 15008;
/// Priority of our `ip rule` (before `main` at 32766).
pub const RULE_PRIORITY: u32 = 15008;
/// The mangle chain we own.
pub const CHAIN: &str = "KERNMESH-HBONE";

/// Why the reply routing could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
}

fn set_transparent(socket: &TcpSocket, v6: bool) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::IPPROTO_IP, libc::IP_TRANSPARENT)
    };
    // SAFETY: setsockopt on a socket we own, with a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects to `dst` from `src` (port 0: any free port); `src = None`, or of the other address
/// family, connects from the node's own address.
pub async fn connect(src: Option<IpAddr>, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src
        && ip.is_ipv4() == dst.is_ipv4()
    {
        set_transparent(&socket, dst.is_ipv6())?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

fn run(program: &str, args: &[String]) -> Result<(), RoutingError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| RoutingError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RoutingError::Command {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The (ip family flag, iptables binary, local route) of each family.
const FAMILIES: [(&str, &str, &str); 2] =
    [("-4", "iptables", "0.0.0.0/0"), ("-6", "ip6tables", "::/0")];

/// Installs the reply routing in the current network namespace (the node's). Idempotent: removes
/// what an earlier run left first. IPv6 is best effort (a node without `ip6tables` gets IPv4 only,
/// and the error says so).
pub fn install() -> Result<(), RoutingError> {
    let _ = uninstall();
    for (i, (family, iptables, any)) in FAMILIES.into_iter().enumerate() {
        let result = (|| {
            run(
                "ip",
                &args(&format!(
                    "{family} rule add fwmark {REPLY_MARK:#x}/{REPLY_MARK:#x} lookup {REPLY_TABLE} priority {RULE_PRIORITY}"
                )),
            )?;
            run(
                "ip",
                &args(&format!(
                    "{family} route replace local {any} dev lo table {REPLY_TABLE}"
                )),
            )?;
            run(iptables, &args(&format!("-w -t mangle -N {CHAIN}")))?;
            run(
                iptables,
                &args(&format!(
                    "-w -t mangle -A {CHAIN} -p tcp -m socket --transparent -j MARK --set-xmark {REPLY_MARK:#x}/{REPLY_MARK:#x}"
                )),
            )?;
            run(
                iptables,
                &args(&format!("-w -t mangle -I PREROUTING -j {CHAIN}")),
            )
        })();
        if let Err(e) = result {
            if i == 0 {
                let _ = uninstall();
                return Err(e);
            }
            tracing::warn!(error = %e, "IPv6 reply routing for transparent HBONE sockets not installed");
        }
    }
    Ok(())
}

/// Removes the reply routing (what exists of it) and says what it removed; never fails —
/// cleanup runs on broken nodes too.
#[must_use = "says what was removed"]
pub fn uninstall() -> Vec<String> {
    let mut removed = Vec::new();
    let mut undo = |program: &str, line: String, what: String| {
        if run(program, &args(&line)).is_ok() {
            removed.push(what);
            true
        } else {
            false
        }
    };
    for (family, iptables, any) in FAMILIES {
        undo(
            iptables,
            format!("-w -t mangle -D PREROUTING -j {CHAIN}"),
            format!("{iptables} mangle PREROUTING jump to {CHAIN}"),
        );
        undo(
            iptables,
            format!("-w -t mangle -F {CHAIN}"),
            format!("{iptables} mangle chain {CHAIN} rules"),
        );
        undo(
            iptables,
            format!("-w -t mangle -X {CHAIN}"),
            format!("{iptables} mangle chain {CHAIN}"),
        );
        while undo(
            "ip",
            format!(
                "{family} rule del fwmark {REPLY_MARK:#x}/{REPLY_MARK:#x} lookup {REPLY_TABLE} priority {RULE_PRIORITY}"
            ),
            format!("ip {family} rule fwmark {REPLY_MARK:#x} lookup {REPLY_TABLE}"),
        ) {}
        undo(
            "ip",
            format!("{family} route del local {any} dev lo table {REPLY_TABLE}"),
            format!("ip {family} route local {any} table {REPLY_TABLE}"),
        );
    }
    removed
}
