//! Graceful drain of the real `mesh-agent gateway` process at SIGTERM: the listener closes at
//! once (new connections refused), a request in flight to a slow backend still gets its answer,
//! and the process exits as soon as it has, well inside the drain period. No kernel needed.
//! Build first: `cargo build -p mesh-agent --bins`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use mesh_tests::gateway::{GatewayProcess, services_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 18089;
const SLOW: Duration = Duration::from_secs(2);

/// A backend answering every request after [`SLOW`].
async fn slow_backend(addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(SLOW).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await;
            });
        }
    }))
}

/// One HTTP/1.1 GET on a new connection: the status line and body.
async fn get(path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", PORT)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"slow") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_finishes_requests_in_flight() -> Result<()> {
    let _backend = slow_backend("127.0.7.1:9007").await?;
    let services = services_yaml(&[("slow", 80, &["127.0.7.1"], 9007, "")]);
    let routes = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {PORT}, protocol: HTTP }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: slow, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  rules:
    - backendRefs: [{{ name: slow, port: 80 }}]
"
    );
    let dir = std::env::temp_dir().join(format!("mesh-gateway-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut gw = GatewayProcess::start(
        &dir,
        &routes,
        &services,
        &["--metrics-addr", "none", "--drain-period", "20s"],
    )?;
    // Ready: a request is answered (slowly).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if get("/").await.is_ok_and(|r| r.ends_with("slow")) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not ready: {}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let in_flight = tokio::spawn(get("/in-flight"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gw.child.id())?);
    let term = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    // New connections are refused within moments.
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", PORT))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), refused)
        .await
        .with_context(|| format!("still accepting after SIGTERM: {}", gw.log_text()))?;
    // The request in flight is answered.
    let answer = in_flight.await??;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"),
        "{answer}\n{}",
        gw.log_text()
    );
    // And the process exits once it is, not at the end of the 20 s drain period.
    let exit = loop {
        if let Some(s) = gw.child.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            term.elapsed() < Duration::from_secs(10),
            "still running after the request finished: {}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}: {}", gw.log_text());
    assert!(
        term.elapsed() + Duration::from_millis(400) >= SLOW,
        "exited before the request in flight finished"
    );
    Ok(())
}
