//! The gateway's thread-per-core design (`--workers N`: N single-threaded runtimes, each with
//! its own `SO_REUSEPORT` listener and backend pool) keeps what one shared runtime gave: a
//! per-client rate limit holds across connections the kernel spreads over every worker, and
//! the drain at SIGTERM waits for requests in flight on every worker. The real
//! `mesh-agent gateway` process and real sockets; no kernel programs. Build first:
//! `cargo build -p mesh-agent --bins`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mesh_tests::gateway::{Backend, GatewayProcess, http_route_yaml, services_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKERS: usize = 4;

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-gateway-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Listening sockets on `port` in this network namespace (`/proc/net/tcp`, state 0A): one
/// per worker when the workers share the port through `SO_REUSEPORT`.
fn listening_sockets(port: u16) -> usize {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
        .count()
}

/// One HTTP/1.1 request on a connection of its own; the status code and the body.
async fn get_on_new_connection(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn wait_ready(port: u16, gw: &GatewayProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if get_on_new_connection(port, "/ready")
            .await
            .is_ok_and(|(s, _)| s == 200)
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "not ready: {}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A per-client limit of 100 per minute admits 100 (+ the refill while the test runs) of 400
/// requests sent on 400 connections at once, spread by the kernel over 4 workers: the workers
/// take from one bucket. With a bucket per worker, up to 400 would pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_client_rate_limit_holds_across_workers() -> Result<()> {
    let port = 18091;
    let _web = Backend::start("web", "127.0.9.1:9091".parse()?).await?;
    let services = services_yaml(&[("web", 80, &["127.0.9.1"], 9091, "")]);
    let policy = "---
apiVersion: gateway.kernmesh.io/v1alpha1
kind: RoutePolicy
metadata: { name: web, namespace: default }
spec:
  targetRefs: [{ kind: HTTPRoute, name: web }]
  rateLimit: { client: { requests: 100, per: 60s } }
";
    let dir = tmpdir("workers-ratelimit");
    let workers = WORKERS.to_string();
    // Unlimited first, to learn when it serves; then the limit is loaded (a reload, which the
    // workers must all see).
    let gw = GatewayProcess::start(
        &dir,
        &http_route_yaml(port, "web", ""),
        &services,
        &["--metrics-addr", "none", "--workers", &workers],
    )?;
    wait_ready(port, &gw).await?;
    assert_eq!(
        listening_sockets(port),
        WORKERS,
        "one SO_REUSEPORT listener per worker: {}",
        gw.log_text()
    );
    gw.set_routes(&http_route_yaml(port, "web", policy))?;
    // The reload is visible once a request is limited (the first 100 pass).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = 0u32;
    loop {
        let (s, _) = get_on_new_connection(port, "/probe").await?;
        if s == 429 {
            break;
        }
        before += 1;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the limit never applied: {}",
            gw.log_text()
        );
        if before.is_multiple_of(50) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The bucket is empty now; wait for it to hold 30 tokens again (100/min: 0.6 s a token).
    tokio::time::sleep(Duration::from_secs(18)).await;
    let started = Instant::now();
    let sends: Vec<_> = (0..400)
        .map(|i| {
            tokio::spawn(get_on_new_connection(
                port,
                if i % 2 == 0 { "/a" } else { "/b" },
            ))
        })
        .collect();
    let (mut ok, mut limited) = (0u32, 0u32);
    for s in sends {
        match s.await??.0 {
            200 => ok += 1,
            429 => limited += 1,
            other => anyhow::bail!("unexpected status {other}"),
        }
    }
    // 30 tokens at the start plus the refill during the burst (≤ 1 token per 0.6 s).
    let refill = started.elapsed().as_secs_f64() / 0.6;
    let allowed = 30.0 + refill;
    let ok_f = f64::from(ok);
    assert!(
        ok_f >= 30.0 * 0.95 && ok_f <= allowed * 1.05 + 1.0,
        "{ok} of 400 passed ({limited} limited); the limit allows {allowed:.1} (±5 %): {}",
        gw.log_text()
    );
    Ok(())
}

const SLOW: Duration = Duration::from_secs(2);

/// A backend answering every request after [`SLOW`].
async fn slow_backend(addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !got.starts_with(b"GET /ready") {
                        tokio::time::sleep(SLOW).await;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    }))
}

/// 32 requests in flight on 32 connections (on all 4 workers: the chance that the kernel's
/// `SO_REUSEPORT` hash puts them all on fewer is below 10⁻³), then SIGTERM: every one is
/// answered, and the process exits once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_waits_for_requests_on_every_worker() -> Result<()> {
    let port = 18092;
    let _backend = slow_backend("127.0.9.2:9092").await?;
    let services = services_yaml(&[("web", 80, &["127.0.9.2"], 9092, "")]);
    let dir = tmpdir("workers-drain");
    let workers = WORKERS.to_string();
    let mut gw = GatewayProcess::start(
        &dir,
        &http_route_yaml(port, "web", ""),
        &services,
        &[
            "--metrics-addr",
            "none",
            "--drain-period",
            "20s",
            "--workers",
            &workers,
        ],
    )?;
    wait_ready(port, &gw).await?;
    assert_eq!(listening_sockets(port), WORKERS, "{}", gw.log_text());
    let in_flight: Vec<_> = (0..32)
        .map(|_| tokio::spawn(get_on_new_connection(port, "/in-flight")))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gw.child.id())?);
    let term = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    // Every worker's listener closes: no listening socket is left on the port.
    let deadline = Instant::now() + Duration::from_secs(1);
    while listening_sockets(port) > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "still listening after SIGTERM: {}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in in_flight {
        let (status, body) = r.await??;
        assert_eq!((status, body.as_str()), (200, "slow"), "{}", gw.log_text());
    }
    let exit = loop {
        if let Some(s) = gw.child.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            term.elapsed() < Duration::from_secs(10),
            "still running after the requests finished: {}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}: {}", gw.log_text());
    assert!(
        term.elapsed() + Duration::from_millis(600) >= SLOW,
        "exited before the requests in flight finished"
    );
    Ok(())
}
