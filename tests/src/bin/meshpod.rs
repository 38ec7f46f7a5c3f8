//! `meshpod`: the workload tool tests run inside pods (as Kubernetes tests run agnhost) — a server
//! that names itself and echoes, and clients that report what they reached as one JSON line.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use mesh_tests::meshpod::{HitReport, Percentiles, RrReport, TransferReport};
use sha2::{Digest as _, Sha256};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::timeout;

/// Longest first line (backend name) a client accepts.
const MAX_NAME: usize = 256;
/// Listen backlog: enough for hundreds of simultaneous connects.
const BACKLOG: u32 = 4096;

#[derive(Parser)]
#[command(
    name = "meshpod",
    about = "Workload tool for mesh tests: serve, hit, transfer, rr"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP: write `NAME\n` on accept, then echo until EOF. UDP: answer each datagram with
    /// `NAME\n`. Prints `ready` once listening; runs until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Open N connections, read each one's first line, report one JSON line.
    Hit(HitArgs),
    /// Send B pseudo-random bytes, half-close, read the echo; report sizes and SHA-256s.
    Transfer(TransferArgs),
    /// N request/response round trips of S bytes over one connection.
    Rr(RrArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Name written to every client.
    #[arg(long)]
    name: String,
    /// TCP address to listen on (repeatable; IPv6 sockets are v6-only).
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// UDP address to answer on (repeatable; IPv6 sockets are v6-only).
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// Listen on this many consecutive TCP ports from each `--tcp` address's port, each naming
    /// itself `NAME:PORT` (one process standing in for thousands of endpoints).
    #[arg(long, default_value_t = 1)]
    tcp_ports: u16,
    /// TCP: write `NAME peer=ADDR\n` instead, ADDR being the client address the server saw.
    #[arg(long)]
    show_peer: bool,
}

#[derive(Args, Clone)]
struct HitArgs {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Connections to open.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Use UDP (connected socket, one datagram, wait for the reply).
    #[arg(long)]
    udp: bool,
    /// Connection i binds source port P+i first (closes with RST so the port is reusable at once).
    #[arg(long)]
    bind_port_base: Option<u16>,
    /// Deadline for connecting and for the first line, each.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Keep connections open after reporting, until stdin closes or SIGTERM.
    #[arg(long)]
    hold: bool,
}

#[derive(Args)]
struct TransferArgs {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Bytes to send.
    #[arg(long)]
    bytes: u64,
    /// Seed of the pseudo-random payload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Deadline for the whole transfer.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct RrArgs {
    /// Where to connect.
    #[arg(long)]
    addr: SocketAddr,
    /// Round trips.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Bytes per request (and response).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Deadline for connecting and for each round trip.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Pause between round trips (a long-lived, mostly idle connection).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_nofile_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshpod: failed to start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Hit(a) => hit(a).await,
            Cmd::Transfer(a) => transfer(a).await,
            Cmd::Rr(a) => rr(a).await,
        }
    });
    // A blocked stdin reader must not keep the process alive.
    rt.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshpod: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Hundreds of held connections need more than the usual 1024 descriptors.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let line = serde_json::to_string(value)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// serve

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    ensure!(
        !args.tcp.is_empty() || !args.udp.is_empty(),
        "give at least one --tcp or --udp address"
    );
    let banner: Arc<[u8]> = format!("{}\n", args.name).into_bytes().into();
    for first in args.tcp {
        for i in 0..args.tcp_ports.max(1) {
            let addr = SocketAddr::new(first.ip(), first.port() + i);
            let listener =
                tcp_listener(addr).with_context(|| format!("failed to listen on tcp {addr}"))?;
            let banner = if args.tcp_ports > 1 {
                format!("{}:{}\n", args.name, addr.port())
                    .into_bytes()
                    .into()
            } else {
                Arc::clone(&banner)
            };
            tokio::spawn(accept_loop(listener, banner, args.show_peer));
        }
    }
    for addr in args.udp {
        let socket = udp_socket(addr).with_context(|| format!("failed to bind udp {addr}"))?;
        tokio::spawn(udp_loop(socket, Arc::clone(&banner)));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        set_v6only(s.as_raw_fd())?;
        s
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    Ok(sock.listen(BACKLOG)?)
}

/// A non-blocking UDP socket bound to `addr` (IPv6 ones v6-only, like the TCP listeners, so
/// `0.0.0.0:P` and `[::]:P` can both be served).
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: creating a socket; the fd is owned by the std socket right below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let std_sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    if addr.is_ipv6() {
        set_v6only(fd)?;
    }
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(UdpSocket::from_std(std_sock)?)
}

fn set_v6only(fd: RawFd) -> Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()).context("IPV6_V6ONLY")
    }
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

async fn accept_loop(listener: TcpListener, banner: Arc<[u8]>, show_peer: bool) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let banner = if show_peer {
                    let name = banner.strip_suffix(b"\n").unwrap_or(&banner);
                    let mut b = name.to_vec();
                    b.extend_from_slice(format!(" peer={peer}\n").as_bytes());
                    Arc::from(b)
                } else {
                    Arc::clone(&banner)
                };
                tokio::spawn(echo(stream, banner));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("meshpod serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream, banner: Arc<[u8]>) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(&banner).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    let _ = tokio::io::copy(&mut rd, &mut wr).await;
    let _ = wr.shutdown().await;
}

async fn udp_loop(socket: UdpSocket, banner: Arc<[u8]>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((_, peer)) => {
                let _ = socket.send_to(&banner, peer).await;
            }
            Err(e) => {
                eprintln!("meshpod serve: udp receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// hit

enum Outcome {
    Ok {
        name: String,
        us: u64,
        mismatch: bool,
    },
    Err(String),
}

enum Held {
    Tcp(#[expect(dead_code, reason = "kept only to hold the connection open")] TcpStream),
    Udp(#[expect(dead_code, reason = "kept only to hold the socket open")] UdpSocket),
}

async fn hit(args: HitArgs) -> Result<ExitCode> {
    if let Some(base) = args.bind_port_base {
        ensure!(
            usize::from(base) + args.count <= 65_536,
            "--bind-port-base {base} + --count {} runs past port 65535",
            args.count
        );
    }
    let args = Arc::new(args);
    let results: Arc<Mutex<Vec<Option<Outcome>>>> =
        Arc::new(Mutex::new((0..args.count).map(|_| None).collect()));
    let held: Arc<Mutex<Vec<Held>>> = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let workers = args.concurrency.clamp(1, args.count.max(1));
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (args, results, held, next) = (
            Arc::clone(&args),
            Arc::clone(&results),
            Arc::clone(&held),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.count {
                    break;
                }
                let outcome = if args.udp {
                    hit_udp(&args, i, &held).await
                } else {
                    hit_tcp(&args, i, &held).await
                };
                results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(outcome);
            }
        }));
    }
    for t in tasks {
        t.await.context("a hit worker panicked")?;
    }
    let mut report = HitReport::default();
    let mut latencies = Vec::new();
    for outcome in results
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
    {
        match outcome.unwrap_or_else(|| Outcome::Err("NOT_RUN".to_owned())) {
            Outcome::Ok { name, us, mismatch } => {
                *report.counts.entry(name.clone()).or_default() += 1;
                report.peer_mismatch += u64::from(mismatch);
                latencies.push(us);
                report.per_conn.push(name);
            }
            Outcome::Err(e) => {
                *report.errors.entry(e.clone()).or_default() += 1;
                report.per_conn.push(e);
            }
        }
    }
    report.connect_us = Percentiles::of(&mut latencies);
    print_json(&report)?;
    if args.hold {
        wait_for_release().await?;
    }
    drop(held);
    Ok(ExitCode::SUCCESS)
}

fn unspecified_like(addr: SocketAddr, port: u16) -> SocketAddr {
    let ip = if addr.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, port)
}

fn source_port(args: &HitArgs, i: usize) -> u16 {
    args.bind_port_base.map_or(0, |base| {
        base.saturating_add(u16::try_from(i).unwrap_or(u16::MAX))
    })
}

async fn hit_tcp(args: &HitArgs, i: usize, held: &Mutex<Vec<Held>>) -> Outcome {
    let deadline = Duration::from_millis(args.timeout_ms);
    let sock = match if args.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    } {
        Ok(s) => s,
        Err(e) => return Outcome::Err(errno_name(&e)),
    };
    if args.bind_port_base.is_some() {
        let bound = sock
            .set_reuseaddr(true)
            .and_then(|()| sock.bind(unspecified_like(args.addr, source_port(args, i))));
        if let Err(e) = bound {
            return Outcome::Err(errno_name(&e));
        }
    }
    let start = Instant::now();
    let mut stream = match timeout(deadline, sock.connect(args.addr)).await {
        Err(_) => return Outcome::Err("TIMEOUT".to_owned()),
        Ok(Err(e)) => return Outcome::Err(errno_name(&e)),
        Ok(Ok(s)) => s,
    };
    let us = micros(start.elapsed());
    let mismatch = stream.peer_addr().map_or(true, |p| p != args.addr);
    let name = match timeout(deadline, read_first_line(&mut stream)).await {
        Err(_) => return Outcome::Err("READ_TIMEOUT".to_owned()),
        Ok(Err(e)) => return Outcome::Err(e),
        Ok(Ok(name)) => name,
    };
    if args.hold {
        held.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Held::Tcp(stream));
    } else if args.bind_port_base.is_some() {
        // RST instead of FIN: no TIME_WAIT, so the same source port works on the next run.
        let _ = stream.set_zero_linger();
    }
    Outcome::Ok { name, us, mismatch }
}

async fn hit_udp(args: &HitArgs, i: usize, held: &Mutex<Vec<Held>>) -> Outcome {
    let deadline = Duration::from_millis(args.timeout_ms);
    let sock = match UdpSocket::bind(unspecified_like(args.addr, source_port(args, i))).await {
        Ok(s) => s,
        Err(e) => return Outcome::Err(errno_name(&e)),
    };
    if let Err(e) = sock.connect(args.addr).await {
        return Outcome::Err(errno_name(&e));
    }
    let start = Instant::now();
    if let Err(e) = sock.send(b"hit\n").await {
        return Outcome::Err(errno_name(&e));
    }
    let mut buf = [0u8; MAX_NAME];
    let n = match timeout(deadline, sock.recv(&mut buf)).await {
        Err(_) => return Outcome::Err("TIMEOUT".to_owned()),
        Ok(Err(e)) => return Outcome::Err(errno_name(&e)),
        Ok(Ok(n)) => n,
    };
    let us = micros(start.elapsed());
    let mismatch = sock.peer_addr().map_or(true, |p| p != args.addr);
    let name = String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if args.hold {
        held.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Held::Udp(sock));
    }
    Outcome::Ok { name, us, mismatch }
}

/// Reads up to the first `\n` (the server sends nothing else before the client writes).
async fn read_first_line(stream: &mut TcpStream) -> std::result::Result<String, String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; MAX_NAME];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| errno_name(&e))?;
        if n == 0 {
            return Err("EOF".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            return Ok(String::from_utf8_lossy(&buf[..pos]).into_owned());
        }
        if buf.len() > MAX_NAME {
            return Err("BAD_NAME".to_owned());
        }
    }
}

async fn wait_for_release() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    // A plain thread: stdin is blocking, and the process exits without joining it.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-watch".to_owned())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(std::io::Read::read(&mut stdin, &mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        })?;
    tokio::select! {
        _ = term.recv() => {}
        _ = rx => {}
    }
    Ok(())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `ECONNREFUSED`-style name of an I/O error.
fn errno_name(e: &std::io::Error) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        (libc::ENETUNREACH, "ENETUNREACH"),
        (libc::ECONNRESET, "ECONNRESET"),
        (libc::ECONNABORTED, "ECONNABORTED"),
        (libc::EADDRINUSE, "EADDRINUSE"),
        (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
        (libc::EPERM, "EPERM"),
        (libc::EACCES, "EACCES"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::EPIPE, "EPIPE"),
        (libc::EMFILE, "EMFILE"),
        (libc::ENFILE, "ENFILE"),
        (libc::ENOENT, "ENOENT"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EPROTO, "EPROTO"),
        (libc::EBUSY, "EBUSY"),
        (libc::ENETDOWN, "ENETDOWN"),
        (libc::EHOSTDOWN, "EHOSTDOWN"),
        (libc::ECANCELED, "ECANCELED"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::ESRCH, "ESRCH"),
    ];
    match e.raw_os_error() {
        Some(code) => NAMES
            .iter()
            .find(|(c, _)| *c == code)
            .map_or_else(|| format!("E{code}"), |(_, n)| (*n).to_owned()),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "EOF".to_owned(),
        None if e.kind() == std::io::ErrorKind::TimedOut => "TIMEOUT".to_owned(),
        None => format!("{:?}", e.kind()),
    }
}

// ---------------------------------------------------------------------------------------------
// transfer and rr

/// xorshift64*: a fast, seedable stream of payload bytes.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

async fn connect(addr: SocketAddr, deadline: Duration) -> Result<TcpStream> {
    let stream = match timeout(deadline, TcpStream::connect(addr)).await {
        Err(_) => bail!("connect to {addr}: TIMEOUT"),
        Ok(Err(e)) => bail!("connect to {addr}: {}", errno_name(&e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn read_name<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<String> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    ensure!(
        line.ends_with(b"\n"),
        "connection closed before the server's name line"
    );
    Ok(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
}

async fn transfer(args: TransferArgs) -> Result<ExitCode> {
    let deadline = Duration::from_millis(args.timeout_ms);
    let mut report = TransferReport {
        sent: args.bytes,
        ..TransferReport::default()
    };
    let run = async {
        let stream = connect(args.addr, deadline).await?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let name = read_name(&mut rd).await?;
        let total = args.bytes;
        let seed = args.seed;
        let writer = tokio::spawn(async move {
            let mut rng = Prng::new(seed);
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = total;
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                rng.fill(&mut buf[..n]);
                hasher.update(&buf[..n]);
                wr.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            wr.shutdown().await?;
            Ok::<_, std::io::Error>((hex(&hasher.finalize()), wr))
        });
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            received += n as u64;
        }
        let (sha_sent, _wr) = writer.await??;
        Ok::<_, anyhow::Error>((name, received, sha_sent, hex(&hasher.finalize())))
    };
    let ok = match timeout(deadline, run).await {
        Ok(Ok((name, received, sent_sha, recv_sha))) => {
            report.name = name;
            report.received = received;
            report.sha256_sent = sent_sha;
            report.sha256_received = recv_sha;
            report.received == report.sent && report.sha256_sent == report.sha256_received
        }
        Ok(Err(e)) => {
            report.error = Some(format!("{e:#}"));
            false
        }
        Err(_) => {
            report.error = Some(format!("TIMEOUT after {deadline:?}"));
            false
        }
    };
    print_json(&report)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn rr(args: RrArgs) -> Result<ExitCode> {
    let deadline = Duration::from_millis(args.timeout_ms);
    let mut report = RrReport {
        count: args.count as u64,
        ..RrReport::default()
    };
    let mut rtts = Vec::with_capacity(args.count);
    let result = async {
        let stream = timeout(deadline, connect(args.addr, deadline))
            .await
            .map_err(|_| anyhow::anyhow!("connect to {}: TIMEOUT", args.addr))??;
        let mut stream = BufReader::new(stream);
        report.name = timeout(deadline, read_name(&mut stream))
            .await
            .map_err(|_| anyhow::anyhow!("no name line within {deadline:?}"))??;
        let mut request = vec![0u8; args.size];
        let mut response = vec![0u8; args.size];
        for i in 0..args.count {
            for (j, b) in request.iter_mut().enumerate() {
                *b = (i.wrapping_mul(31).wrapping_add(j)) as u8;
            }
            let start = Instant::now();
            let round = async {
                stream.get_mut().write_all(&request).await?;
                stream.read_exact(&mut response).await?;
                Ok::<_, std::io::Error>(())
            };
            match timeout(deadline, round).await {
                Err(_) => bail!("round trip {i}: TIMEOUT"),
                Ok(Err(e)) => bail!("round trip {i}: {}", errno_name(&e)),
                Ok(Ok(())) => {}
            }
            ensure!(response == request, "round trip {i}: echo differs");
            rtts.push(micros(start.elapsed()));
            report.ok += 1;
            if args.pause_ms > 0 {
                tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
            }
        }
        Ok(())
    }
    .await;
    report.rtt_us = Percentiles::of(&mut rtts);
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    print_json(&report)?;
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
