//! Access lines are buffered (a flush thread writes them, as Envoy's access-log file) yet never
//! lost when the process stops: the real `mesh-agent gateway` with a one-hour flush interval
//! answers requests, holds their lines, and writes every one of them at SIGTERM. No kernel
//! needed. Build first: `cargo build -p mesh-agent --bins`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    agent::{workspace_binary, write_atomically},
    gateway::{Backend, http_route_yaml, services_yaml},
};

const PORT: u16 = 18_471;
const BACKEND: &str = "127.0.7.9:9071";
const REQUESTS: usize = 40;

fn lines_with(log: &str, prefix: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"] == "request complete"
                && v["path"].as_str().is_some_and(|p| p.starts_with(prefix))
        })
        .collect()
}

/// Starts the gateway in `dir` with its access log on and a flush interval of an hour; its
/// stdout and stderr go to the returned log file.
fn spawn_gateway(dir: &std::path::Path) -> Result<(std::process::Child, std::path::PathBuf)> {
    let (routes, services) = (dir.join("routes.yaml"), dir.join("services.yaml"));
    write_atomically(&routes, &http_route_yaml(PORT, "web", ""))?;
    write_atomically(
        &services,
        &services_yaml(&[("web", 80, &["127.0.7.9"], 9071, "")]),
    )?;
    let log = dir.join("gateway.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(workspace_binary("mesh-agent")?)
        .arg("gateway")
        .arg("--routes")
        .arg(&routes)
        .arg("--config-file")
        .arg(&services)
        .args(["--listen-address", "127.0.0.1", "--metrics-addr", "none"])
        .args(["--access-log", "true", "--drain-period", "5s"])
        // Nothing reaches stdout by the timer during the test: only the size or the stop.
        .env("MESH_ACCESS_LOG_FLUSH_INTERVAL", "1h")
        .env("RUST_LOG", "warn")
        .stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .context("starting mesh-agent gateway")?;
    Ok((child, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_access_lines_are_all_written_at_sigterm() -> Result<()> {
    let _backend = Backend::start("web", BACKEND.parse()?).await?;
    let dir = std::env::temp_dir().join(format!("mesh-access-flush-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (mut gw, log) = spawn_gateway(&dir)?;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let result = async {
        // Routed once a request to it is answered by the backend.
        let url = |path: &str| format!("http://127.0.0.1:{PORT}{path}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(url("/ready"))
                .output()?;
            if out.stdout == b"200" {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "gateway not routing: {}",
                read_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // REQUESTS on one keep-alive connection; curl closes it when done (no drain wait).
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "%{http_code}\n"])
            // `-o` is per URL: every body to /dev/null, only the codes on stdout.
            .args(
                (0..REQUESTS)
                    .flat_map(|i| ["-o".into(), "/dev/null".into(), url(&format!("/flush/{i}"))]),
            )
            .output()?;
        let codes = String::from_utf8_lossy(&out.stdout);
        ensure!(
            codes.lines().filter(|c| *c == "200").count() == REQUESTS,
            "{codes}"
        );
        // Answered, but their lines are still in the worker's buffer (a few KiB, far below
        // the flush size): what follows tests the stop, not the timer.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = lines_with(&read_log(), "/flush/").len();
        ensure!(before == 0, "lines written before the stop: {before}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(gw.id())?),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = gw.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                bail!("gateway did not exit after SIGTERM: {}", read_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(status.success(), "gateway exit {status}: {}", read_log());
        let text = read_log();
        let lines = lines_with(&text, "/flush/");
        let mut paths: Vec<String> = lines
            .iter()
            .map(|l| l["path"].as_str().unwrap_or_default().to_owned())
            .collect();
        ensure!(
            paths.len() == REQUESTS,
            "{} lines of {REQUESTS}: {text}",
            paths.len()
        );
        paths.sort_by_key(|p| p[7..].parse::<usize>().unwrap_or(usize::MAX));
        let want: Vec<String> = (0..REQUESTS).map(|i| format!("/flush/{i}")).collect();
        ensure!(paths == want, "{paths:?}");
        for l in &lines {
            ensure!(l["target"] == "mesh_access" && l["status"] == 200, "{l}");
        }
        Ok(())
    }
    .await;
    let _ = gw.kill();
    let _ = gw.wait();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
