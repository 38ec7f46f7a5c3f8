//! HTTP/2 hostile input against the real `mesh-agent gateway` over TLS with ALPN h2 (issue 10,
//! "Hostile input"): rapid reset, a CONTINUATION flood and an HPACK bomb, frames written by hand.
//! Each gets its answer, 200 connections of each leave the gateway's memory flat, and it keeps
//! serving without a panic. The answers are the `h2` crate's, with the limits the gateway sets in
//! `h2_settings!` (`mesh-agent/src/gateway/server.rs`). No kernel needed.
//! Build first: `cargo build -p mesh-agent --bins`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::bench_mtls::rss_kb;
use mesh_tests::gateway::{Backend, GatewayProcess, services_yaml, tls_route_yaml, wait_for};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

// Frame types and flags (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
// Error codes (RFC 9113 §7).
const PROTOCOL_ERROR: u32 = 0x1;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;
// SETTINGS parameters (RFC 9113 §6.5.2).
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

const HOST: &str = "h2.example.com";
/// Connections per attack in the memory check, `BATCH` at a time.
const ROUNDS: usize = 200;
const BATCH: usize = 10;
/// How much the gateway's RSS may grow over `ROUNDS` connections of one attack: 8 MiB, so
/// keeping 41 KiB per connection (less than half of one flood's 96 KiB header block, a
/// hundredth of what one bomb decodes to) fails. Measured: +0.7 to +1.8 MiB.
const RSS_GROWTH_MAX_KIB: f64 = 8.0 * 1024.0;
/// Longest wait for an answer: generous, other builds and tests share the machine.
const WAIT: Duration = Duration::from_secs(10);

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-gateway-h2-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating the test's directory");
    d
}

// ---------------------------------------------------------------------------------------------
// Frames and HPACK, by hand (a real client library would refuse to send these sequences)

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a test frame under 16 MiB");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK integer with a `prefix`-bit prefix after the representation's flag bits `first`
/// (RFC 7541 §5.1).
fn hpack_int(first: u8, prefix: u32, value: usize, out: &mut Vec<u8>) {
    let max = (1_usize << prefix) - 1;
    if value < max {
        out.push(first | u8::try_from(value).expect("under the prefix"));
        return;
    }
    out.push(first | u8::try_from(max).expect("a prefix of at most 8 bits"));
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(u8::try_from(rest & 0x7f).expect("7 bits") | 0x80);
        rest >>= 7;
    }
    out.push(u8::try_from(rest).expect("7 bits"));
}

/// A header field with a new (literal) name and raw strings (RFC 7541 §6.2): `first` is 0x40
/// to add it to the dynamic table, 0x00 not to.
fn literal(first: u8, name: &str, value: &[u8]) -> Vec<u8> {
    let mut b = vec![first];
    hpack_int(0, 7, name.len(), &mut b);
    b.extend(name.as_bytes());
    hpack_int(0, 7, value.len(), &mut b);
    b.extend(value);
    b
}

/// Complete header fields (one `x-flood` literal) of exactly `len` bytes, `len` ≥ 12.
fn filler(len: usize) -> Vec<u8> {
    // The value's length prefix takes 1 to 4 bytes; pick the value size that fills `len`.
    for prefix_len in 1..=4 {
        let value = len - 1 - 1 - "x-flood".len() - prefix_len;
        let b = literal(0, "x-flood", &vec![b'f'; value]);
        if b.len() == len {
            return b;
        }
    }
    unreachable!("some prefix length fits {len}")
}

/// `GET https://h2.example.com{path}`: static-table indexes for `:method GET` and `:scheme
/// https`, then `:path` and `:authority` as literals with indexed names, not added to the table.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04];
    hpack_int(0, 7, path.len(), &mut b);
    b.extend(path.as_bytes());
    b.push(0x01);
    hpack_int(0, 7, HOST.len(), &mut b);
    b.extend(HOST.as_bytes());
    b
}

/// The `:status` of a response header block, when it comes first as a static-table index or
/// a literal with the indexed name `:status` (how h2 encodes responses); `None` otherwise.
fn status(block: &[u8]) -> Option<u16> {
    let (&first, rest) = block.split_first()?;
    if first & 0x80 != 0 {
        // RFC 7541 Appendix A, indexes 8 to 14.
        let code = [200, 204, 206, 304, 400, 404, 500];
        return code.get(usize::from(first & 0x7f).checked_sub(8)?).copied();
    }
    // With incremental indexing (0x40 | 8), without (0x08) or never indexed (0x18).
    if !matches!(first, 0x48 | 0x08 | 0x18) {
        return None;
    }
    let (&head, rest) = rest.split_first()?;
    let bytes = rest.get(..usize::from(head & 0x7f))?;
    let text = if head & 0x80 == 0 {
        String::from_utf8(bytes.to_vec()).ok()?
    } else {
        huffman_digits(bytes)?
    };
    text.parse().ok()
}

/// Decodes a Huffman-coded string of decimal digits (RFC 7541 Appendix B: '0'–'2' are the
/// 5-bit codes 0–2, '3'–'9' the 6-bit codes 0x19–0x1f); `None` for anything else.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |bits: &[u8]| bits.iter().fold(0_u8, |v, b| v << 1 | b);
    let mut out = String::new();
    let mut i = 0;
    while i < bits.len() {
        let left = &bits[i..];
        if left.len() < 8 && left.iter().all(|&b| b == 1) {
            break; // padding: the most significant bits of the EOS code
        }
        match (left.get(..5).map(value), left.get(..6).map(value)) {
            (Some(v @ 0..=2), _) => {
                out.push(char::from(b'0' + v));
                i += 5;
            }
            (_, Some(v @ 0x19..=0x1f)) => {
                out.push(char::from(b'3' + v - 0x19));
                i += 6;
            }
            _ => return None,
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/2 client over TLS

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// One frame, or `None` once the connection is closed (end of stream, TLS or TCP reset).
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>> {
    let mut head = [0_u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).context("reading a frame"),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0_u8; len];
    r.read_exact(&mut payload)
        .await
        .context("reading a frame's payload")?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into()?) & 0x7fff_ffff,
        payload,
    }))
}

/// A GOAWAY's error code and debug data.
struct GoAway {
    code: u32,
    debug: String,
}

impl GoAway {
    fn parse(f: &Frame) -> Result<Self> {
        ensure!(
            f.payload.len() >= 8,
            "a GOAWAY of {} bytes",
            f.payload.len()
        );
        Ok(Self {
            code: u32::from_be_bytes(f.payload[4..8].try_into()?),
            debug: String::from_utf8_lossy(&f.payload[8..]).into_owned(),
        })
    }
}

/// What the gateway's first SETTINGS says (defaults of RFC 9113 §6.5.2 where it is silent).
#[expect(
    clippy::struct_field_names,
    reason = "the names of RFC 9113's settings"
)]
#[derive(Clone, Copy, Debug)]
struct Settings {
    max_frame_size: usize,
    max_header_list_size: usize,
    header_table_size: usize,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

struct H2 {
    tls: Tls,
    settings: Settings,
}

impl H2 {
    /// TLS with ALPN h2, the client preface and an empty SETTINGS; reads the gateway's
    /// SETTINGS (the first frame of its preface, RFC 9113 §3.4) and acknowledges it.
    async fn connect(port: u16, cert: &rcgen::Certificate) -> Result<Self> {
        let mut tls = mesh_tests::gateway::tls_client(port, HOST, &[cert], b"h2").await?;
        ensure!(
            tls.get_ref().1.alpn_protocol() == Some(b"h2"),
            "the gateway did not choose h2"
        );
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        tls.write_all(&out).await?;
        let first = tokio::time::timeout(WAIT, read_frame(&mut tls))
            .await
            .context("no SETTINGS from the gateway")??
            .context("the gateway closed before its SETTINGS")?;
        ensure!(
            first.kind == SETTINGS && first.flags & ACK == 0,
            "the gateway's first frame is of type {:#x}",
            first.kind
        );
        let mut settings = Settings {
            max_frame_size: 16_384,
            max_header_list_size: usize::MAX,
            header_table_size: 4_096,
        };
        for p in first.payload.chunks_exact(6) {
            let value = usize::try_from(u32::from_be_bytes(p[2..6].try_into()?))?;
            match u16::from_be_bytes([p[0], p[1]]) {
                SETTINGS_HEADER_TABLE_SIZE => settings.header_table_size = value,
                SETTINGS_MAX_FRAME_SIZE => settings.max_frame_size = value,
                SETTINGS_MAX_HEADER_LIST_SIZE => settings.max_header_list_size = value,
                _ => {}
            }
        }
        tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
        Ok(Self { tls, settings })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// The next frame other than SETTINGS, PING and `WINDOW_UPDATE` (SETTINGS and PING are
    /// acknowledged); `None` once the connection is closed; an error after `WAIT`.
    async fn next(&mut self) -> Result<Option<Frame>> {
        self.next_within(WAIT)
            .await?
            .with_context(|| format!("no frame within {WAIT:?}"))
    }

    /// As `next`, `Ok(None)` when nothing came within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Result<Option<Option<Frame>>> {
        let read = async {
            loop {
                let Some(f) = read_frame(&mut self.tls).await? else {
                    return Ok(None);
                };
                match f.kind {
                    SETTINGS if f.flags & ACK == 0 => {
                        self.tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
                    }
                    PING if f.flags & ACK == 0 => {
                        self.tls.write_all(&frame(PING, ACK, 0, &f.payload)).await?;
                    }
                    SETTINGS | PING | 0x8 => {}
                    _ => return Ok(Some(f)),
                }
            }
        };
        match tokio::time::timeout(wait, read).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Reads until a GOAWAY, then until the connection closes: the GOAWAY.
    async fn goaway_and_close(&mut self) -> Result<GoAway> {
        let goaway = loop {
            match self.next().await? {
                Some(f) if f.kind == GOAWAY => break GoAway::parse(&f)?,
                Some(_) => {}
                None => bail!("the connection closed without a GOAWAY"),
            }
        };
        while self.next().await?.is_some() {}
        Ok(goaway)
    }

    /// `GET {path}` on `stream`: the answer's status.
    async fn get(&mut self, stream: u32, path: &str) -> Result<u16> {
        self.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            stream,
            &get_block(path),
        ))
        .await?;
        self.response(stream).await
    }

    /// The status of the response HEADERS on `stream`.
    async fn response(&mut self, stream: u32) -> Result<u16> {
        loop {
            let f = self.next().await?.with_context(|| {
                format!("the connection closed before stream {stream}'s answer")
            })?;
            if f.kind == GOAWAY {
                let g = GoAway::parse(&f)?;
                bail!("GOAWAY {:#x} {:?} instead of an answer", g.code, g.debug);
            }
            if f.kind == RST_STREAM && f.stream == stream {
                bail!("stream {stream} reset: {:?}", f.payload);
            }
            if f.kind == HEADERS && f.stream == stream {
                return status(&f.payload)
                    .with_context(|| format!("no :status first in {:02x?}", f.payload));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway under attack

struct Setup {
    gw: GatewayProcess,
    backend: Backend,
    cert: rcgen::Certificate,
    port: u16,
}

impl Setup {
    /// A gateway with one TLS listener for `HOST` on `port`, routing to an echo backend on
    /// `backend` (a loopback address), answering a normal request.
    async fn start(name: &str, port: u16, backend: &str) -> Result<Self> {
        let addr: std::net::SocketAddr = backend.parse()?;
        let backend = Backend::start(name, addr).await?;
        let (routes, cert) = tls_route_yaml(port, HOST, name)?;
        let ip = addr.ip().to_string();
        let services = services_yaml(&[(name, 80, &[ip.as_str()], addr.port(), "")]);
        let metrics = format!("127.0.0.1:{}", port + 1000);
        let gw = GatewayProcess::start(
            &tmpdir(name),
            &routes,
            &services,
            &["--metrics-addr", &metrics],
        )?;
        let s = Self {
            gw,
            backend,
            cert,
            port,
        };
        let cert = &s.cert;
        wait_for(
            &format!("the gateway to answer on {port}"),
            Duration::from_secs(30),
            || async move {
                match H2::connect(port, cert).await {
                    Ok(mut c) => c.get(1, "/ready").await.is_ok_and(|st| st == 200),
                    Err(_) => false,
                }
            },
        )
        .await
        .with_context(|| format!("gateway log: {}", s.gw.log_text()))?;
        Ok(s)
    }

    /// Client connections the gateway counted as ended by h2's GOAWAY with `reason`.
    async fn goaways(&self, reason: &str) -> Result<f64> {
        mesh_tests::gateway::metric(
            &format!("127.0.0.1:{}", self.port + 1000),
            &format!(
                "mesh_gateway_connection_errors_total{{protocol=\"http2\",error=\"goaway_{reason}\"}}"
            ),
        )
        .await
    }

    fn pid(&self) -> u32 {
        self.gw.child.id()
    }

    /// Runs `attack` on `ROUNDS` fresh connections, `BATCH` at a time, after one batch of
    /// warm-up (what the first connections allocate for good: worker arenas, TLS state):
    /// the gateway's RSS grows by less than `RSS_GROWTH_MAX_KIB`, it still answers a normal
    /// request, and it never panicked.
    async fn rounds<F, Fut>(&self, what: &str, attack: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        futures::future::try_join_all((0..BATCH).map(|_| attack()))
            .await
            .with_context(|| format!("{what}, warm-up; gateway log: {}", self.gw.log_text()))?;
        let before = rss_kb(self.pid())?;
        for _ in 0..ROUNDS / BATCH {
            futures::future::try_join_all((0..BATCH).map(|_| attack()))
                .await
                .with_context(|| format!("{what}; gateway log: {}", self.gw.log_text()))?;
        }
        let after = rss_kb(self.pid())?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let peak = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .map_or("?", str::trim);
        println!(
            "{what}: gateway RSS {before:.0} KiB before {ROUNDS} connections, {after:.0} KiB after \
             (+{:.0} KiB), peak {peak}",
            after - before
        );
        ensure!(
            after - before < RSS_GROWTH_MAX_KIB,
            "{what}: the gateway's RSS grew from {before:.0} to {after:.0} KiB over {ROUNDS} \
             connections"
        );
        let mut c = H2::connect(self.port, &self.cert).await?;
        ensure!(
            c.get(1, "/after").await? == 200,
            "{what}: no 200 afterwards"
        );
        let log = self.gw.log_text();
        ensure!(
            !log.contains("panicked"),
            "{what}: the gateway panicked: {log}"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rapid reset (CVE-2023-44487)

/// 200 requests, each cancelled (`RST_STREAM` CANCEL) right after its HEADERS, in one write.
fn rapid_reset() -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..200_u32 {
        let id = 2 * i + 1;
        b.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &get_block("/"),
        ));
        b.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    b
}

/// Opens a connection, resets streams rapidly: GOAWAY `ENHANCE_YOUR_CALM`, then the connection
/// closes. h2 counts streams the client resets before the server took them
/// (`max_pending_accept_reset_streams`, 20 in `h2_settings!`; h2's `recv_reset` in
/// `proto/streams/recv.rs` answers `"too_many_resets"` past it).
async fn rapid_reset_attack(port: u16, cert: &rcgen::Certificate) -> Result<()> {
    let mut c = H2::connect(port, cert).await?;
    c.send(&rapid_reset()).await?;
    let g = c.goaway_and_close().await?;
    ensure!(
        g.code == ENHANCE_YOUR_CALM && g.debug == "too_many_resets",
        "rapid reset: GOAWAY {:#x} {:?}",
        g.code,
        g.debug
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_others_are_served() -> Result<()> {
    let s = Setup::start("h2-reset", 18_481, "127.0.48.1:9048").await?;
    // A well-behaved client on its own connection, asking all along.
    let mut bystander = H2::connect(s.port, &s.cert).await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let asking = tokio::spawn(async move {
        let mut answered = 0_u32;
        for stream in (1_u32..).step_by(2) {
            let st = bystander.get(stream, "/bystander").await?;
            ensure!(st == 200, "the bystander's request {stream} got {st}");
            answered += 1;
            if stop_rx.try_recv().is_ok() {
                return Ok(answered);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!("the stream ids run out after 2^30 requests")
    });
    rapid_reset_attack(s.port, &s.cert).await?;
    s.rounds("rapid reset", || rapid_reset_attack(s.port, &s.cert))
        .await?;
    let _ = stop_tx.send(());
    let answered = asking.await??;
    ensure!(answered >= 2, "the bystander got {answered} answers");
    // Streams h2 handed to the gateway before their reset arrived may reach the backend; the
    // others never do.
    let hits = s.backend.hits.load(Ordering::Relaxed);
    println!("rapid reset: the bystander got {answered} answers; the backend saw {hits} requests");
    // Every attack connection ended with h2's GOAWAY, which no request handler saw: counted.
    let counted = s.goaways("enhance_your_calm").await?;
    println!("rapid reset: {counted} connections counted as GOAWAY ENHANCE_YOUR_CALM");
    // The 200 attack connections of the measured rounds, at least (and the warm-up's).
    ensure!(
        counted >= 200.0,
        "only {counted} rapid-reset GOAWAYs counted"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CONTINUATION flood

/// How many CONTINUATION frames without `END_HEADERS` h2 reads before it answers GOAWAY
/// `ENHANCE_YOUR_CALM` `"too_many_continuations"`: the frames a maximal header list needs plus a
/// quarter, at least 5 (h2 0.4.20, `calc_max_continuation_frames` in `codec/framed_read.rs`).
fn continuation_limit(s: Settings) -> usize {
    let frames = (s.max_header_list_size / s.max_frame_size).max(1);
    (frames + frames / 4).max(5)
}

/// The start of a request whose header block never ends: HEADERS without `END_HEADERS`.
fn unfinished_headers() -> Vec<u8> {
    frame(HEADERS, END_STREAM, 1, &get_block("/flood"))
}

/// A full-size CONTINUATION frame without `END_HEADERS`, holding complete header fields. (A
/// CONTINUATION that repeats a pseudo-header instead, as session 22's draft did with `:path`,
/// makes the block malformed: h2 resets the stream and drops the block, so the *next*
/// CONTINUATION belongs to no block: GOAWAY `PROTOCOL_ERROR`, RFC 9113 §6.10.)
fn continuation(s: Settings) -> Vec<u8> {
    frame(CONTINUATION, 0, 1, &filler(s.max_frame_size))
}

/// Writes `first`, then `next` over and over until a write fails or 64 MiB are sent: the
/// bytes sent and how it ended.
async fn write_until_closed<W: AsyncWrite + Unpin>(
    mut w: W,
    first: Vec<u8>,
    next: Vec<u8>,
) -> (usize, std::io::Result<()>) {
    if let Err(e) = w.write_all(&first).await {
        return (0, Err(e));
    }
    let mut sent = first.len();
    while sent < 64 << 20 {
        if let Err(e) = w.write_all(&next).await {
            return (sent, Err(e));
        }
        sent += next.len();
    }
    (sent, Ok(()))
}

/// Opens a connection and writes HEADERS and full-size CONTINUATION frames until the write
/// fails (at most 64 MiB): the gateway answers GOAWAY `ENHANCE_YOUR_CALM`
/// `"too_many_continuations"` and closes while the client is still writing.
async fn continuation_flood_attack(port: u16, cert: &rcgen::Certificate) -> Result<()> {
    let c = H2::connect(port, cert).await?;
    let next = continuation(c.settings);
    let (mut r, w) = tokio::io::split(c.tls);
    let writer = tokio::spawn(write_until_closed(w, unfinished_headers(), next));
    let goaway = loop {
        match tokio::time::timeout(WAIT, read_frame(&mut r)).await?? {
            Some(f) if f.kind == GOAWAY => break GoAway::parse(&f)?,
            Some(_) => {}
            None => bail!("the connection closed without a GOAWAY"),
        }
    };
    ensure!(
        goaway.code == ENHANCE_YOUR_CALM && goaway.debug == "too_many_continuations",
        "CONTINUATION flood: GOAWAY {:#x} {:?}",
        goaway.code,
        goaway.debug
    );
    while tokio::time::timeout(WAIT, read_frame(&mut r))
        .await??
        .is_some()
    {}
    // The gateway closed: the endless writer fails (a reset, or a broken pipe).
    let (sent, wrote) = tokio::time::timeout(WAIT, writer).await??;
    ensure!(
        wrote.is_err(),
        "the flood's writer sent {sent} bytes without an error"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_after_a_bounded_header_block() -> Result<()> {
    let s = Setup::start("h2-flood", 18_482, "127.0.48.2:9048").await?;
    // The bound, exactly: the gateway waits for the rest of the block up to the limit …
    let mut c = H2::connect(s.port, &s.cert).await?;
    let limit = continuation_limit(c.settings);
    let mut out = unfinished_headers();
    for _ in 0..limit {
        out.extend(continuation(c.settings));
    }
    c.send(&out).await?;
    if let Some(f) = c.next_within(Duration::from_millis(500)).await? {
        bail!(
            "after {limit} CONTINUATION frames: a frame of type {:#x} (or the end: {})",
            f.as_ref().map_or(0, |f| f.kind),
            f.is_none()
        );
    }
    // … and the next CONTINUATION is one too many.
    c.send(&continuation(c.settings)).await?;
    let g = c.goaway_and_close().await?;
    ensure!(
        g.code == ENHANCE_YOUR_CALM && g.debug == "too_many_continuations",
        "CONTINUATION {}: GOAWAY {:#x} {:?}",
        limit + 1,
        g.code,
        g.debug
    );
    let bytes = out.len() + continuation(c.settings).len();
    println!(
        "CONTINUATION flood: {limit} frames allowed (max_header_list_size {}, max_frame_size {}); \
         GOAWAY after {bytes} bytes of frames",
        c.settings.max_header_list_size, c.settings.max_frame_size
    );
    // Session 22's draft repeated `:path` in each CONTINUATION: the first one makes the block
    // malformed, h2 resets the stream (a stream error, RFC 9113 §8.1.1; `framed_read.rs`,
    // "malformed CONTINUATION frame") and drops the block, so the second CONTINUATION follows
    // no HEADERS: GOAWAY PROTOCOL_ERROR ("received unexpected CONTINUATION frame", §6.10). The
    // stream's RST_STREAM, queued in the same read, is superseded by the GOAWAY.
    let mut c = H2::connect(s.port, &s.cert).await?;
    let mut out = unfinished_headers();
    for _ in 0..1000 {
        out.extend(frame(CONTINUATION, 0, 1, &[0x84]));
    }
    c.send(&out).await?;
    let g = c.goaway_and_close().await?;
    ensure!(
        g.code == PROTOCOL_ERROR,
        "a CONTINUATION after the reset: GOAWAY {:#x} {:?}",
        g.code,
        g.debug
    );
    s.rounds("CONTINUATION flood", || {
        continuation_flood_attack(s.port, &s.cert)
    })
    .await?;
    // Only the readiness check and the request after the rounds reached the backend.
    let hits = s.backend.hits.load(Ordering::Relaxed);
    ensure!(hits == 2, "the backend saw {hits} requests");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HPACK bomb

/// A request whose header block adds one field as large as the dynamic table holds, then
/// refers to it `refs` times with one byte each (index 62, the newest entry): each reference
/// decodes to the whole field. `None`: as many references as fill the frame. Returns the frame
/// and the header list size it decodes to.
fn hpack_bomb(s: Settings, stream: u32, refs: Option<usize>) -> (Vec<u8>, usize) {
    let name = "x-bomb";
    // An entry's size is its name and value plus 32 (RFC 7541 §4.1).
    let value = s.header_table_size - name.len() - 32;
    let mut block = get_block("/bomb");
    block.extend(literal(0x40, name, &vec![b'b'; value]));
    let refs = refs.unwrap_or(s.max_frame_size - block.len());
    block.extend(std::iter::repeat_n(0x80 | 0x3e, refs));
    let decoded = (refs + 1) * s.header_table_size;
    (
        frame(HEADERS, END_STREAM | END_HEADERS, stream, &block),
        decoded,
    )
}

/// On one connection: a bomb that decodes to twice `max_header_list_size` is refused with 431
/// (h2 sends it itself, `proto/streams/streams.rs`, `RecvHeaderBlockError::Oversize`) and the
/// connection serves on; a full-frame bomb (about 50 MB once decoded) gets GOAWAY
/// `ENHANCE_YOUR_CALM` `"header_list_way_too_large"`: h2 stops decoding past four times the
/// limit (`MAX_HEADER_LIST_ABUSE_MULTIPLIER`, `frame/headers.rs`).
async fn hpack_bomb_attack(port: u16, cert: &rcgen::Certificate) -> Result<()> {
    let mut c = H2::connect(port, cert).await?;
    let s = c.settings;
    let (small, _) = hpack_bomb(s, 1, Some(2 * s.max_header_list_size / s.header_table_size));
    c.send(&small).await?;
    let st = c.response(1).await?;
    ensure!(st == 431, "a header block over the limit got {st}");
    let (big, _) = hpack_bomb(s, 3, None);
    c.send(&big).await?;
    let g = c.goaway_and_close().await?;
    ensure!(
        g.code == ENHANCE_YOUR_CALM && g.debug == "header_list_way_too_large",
        "HPACK bomb: GOAWAY {:#x} {:?}",
        g.code,
        g.debug
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_is_refused_without_decoding_it() -> Result<()> {
    let s = Setup::start("h2-bomb", 18_483, "127.0.48.3:9048").await?;
    let mut c = H2::connect(s.port, &s.cert).await?;
    let set = c.settings;
    // Just over the limit: 431 on the stream, and the connection (its HPACK state intact)
    // serves the next request.
    let refs = set.max_header_list_size / set.header_table_size + 1;
    let (small, decoded) = hpack_bomb(set, 1, Some(refs));
    c.send(&small).await?;
    let st = c.response(1).await?;
    ensure!(
        st == 431,
        "{} bytes decoding to {decoded} got {st}",
        small.len()
    );
    ensure!(c.get(3, "/after-431").await? == 200);
    // Far over it: GOAWAY.
    let (big, decoded) = hpack_bomb(set, 5, None);
    c.send(&big).await?;
    let g = c.goaway_and_close().await?;
    ensure!(
        g.code == ENHANCE_YOUR_CALM && g.debug == "header_list_way_too_large",
        "HPACK bomb of {} bytes decoding to {decoded}: GOAWAY {:#x} {:?}",
        big.len(),
        g.code,
        g.debug
    );
    println!(
        "HPACK bomb: {} bytes that decode to {decoded} bytes: GOAWAY; the limit is {} (h2 stops \
         decoding past four times that)",
        big.len(),
        set.max_header_list_size
    );
    s.rounds("HPACK bomb", || hpack_bomb_attack(s.port, &s.cert))
        .await?;
    // Only the readiness check and the requests after the 431 and after the rounds reached
    // the backend.
    let hits = s.backend.hits.load(Ordering::Relaxed);
    ensure!(hits == 3, "the backend saw {hits} requests");
    Ok(())
}
