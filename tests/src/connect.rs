//! One TCP connect from inside a pod and what it saw (errno, time, peer, the server's first
//! line): how the kernel tests observe capture, refusals and fail-fast.

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::PodHandle;

/// What a connect from inside a pod saw.
#[derive(Debug, Serialize, Deserialize)]
pub struct Connect {
    /// `None` on success, else the OS error number.
    pub errno: Option<i32>,
    pub elapsed_us: u64,
    /// `getpeername()` after a successful connect.
    pub peer: Option<SocketAddr>,
    /// The first line the server sent (its name), if any.
    pub line: Option<String>,
}

/// Connects from `pod` to `to` (timeout `limit`), reads the server's first line.
#[must_use]
pub fn connect_from(pod: &PodHandle, to: SocketAddr, limit: Duration) -> Connect {
    pod.run(move || {
        let start = Instant::now();
        match TcpStream::connect_timeout(&to, limit) {
            Ok(mut s) => {
                let elapsed_us = start.elapsed().as_micros() as u64;
                let peer = s.peer_addr().ok();
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                let line = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .map(str::to_owned);
                Connect {
                    errno: None,
                    elapsed_us,
                    peer,
                    line,
                }
            }
            Err(e) => Connect {
                errno: Some(
                    e.raw_os_error()
                        .unwrap_or(if e.kind() == ErrorKind::TimedOut {
                            libc::ETIMEDOUT
                        } else {
                            -1
                        }),
                ),
                elapsed_us: start.elapsed().as_micros() as u64,
                peer: None,
                line: None,
            },
        }
    })
    .expect("pod closure runs")
}

/// TCP segments the pod's network namespace has received (`InSegs` of `/proc/net/snmp`).
#[must_use]
pub fn tcp_in_segs(pod: &PodHandle) -> u64 {
    pod.run(|| {
        let snmp = std::fs::read_to_string("/proc/self/net/snmp").unwrap_or_default();
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InSegs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    })
    .expect("pod closure runs")
}
