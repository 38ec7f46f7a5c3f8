//! `cargo xtask fuzz`: the pinned cargo-fuzz, then each libFuzzer target for a time budget, with runs and outcome recorded.
//!
//! cargo-fuzz needs nightly flags (`-Z sanitizer`, sancov passes); like the eBPF build we allow them
//! on the stable toolchain with `RUSTC_BOOTSTRAP=1`. Targets live in `fuzz/fuzz_targets/`, corpora in
//! `fuzz/corpus/<target>` (kept between runs, not committed), crashes in `fuzz/artifacts/<target>`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::step::Step;
use crate::{cmd, linker, workspace};

/// The cargo-fuzz release the project pins.
const VERSION: &str = "0.13.1";

/// Runs every target (or the named ones) for `secs` seconds each; fails on the first crash.
pub fn run(targets: &[String], secs: u64) -> Result<()> {
    let bin = ensure()?;
    let root = workspace::root();
    let all = list(&bin, &root)?;
    let chosen: Vec<String> = if targets.is_empty() {
        all
    } else {
        for t in targets {
            if !all.contains(t) {
                bail!("no fuzz target `{t}`; targets are: {}", all.join(", "));
            }
        }
        targets.to_vec()
    };
    let out_dir = root.join("target/fuzz");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut rows = Vec::new();
    for target in &chosen {
        rows.push(run_one(&bin, &root, &out_dir, target, secs)?);
    }
    let summary = out_dir.join("summary.json");
    let json = format!(
        "[\n{}\n]\n",
        rows.iter()
            .map(|r| format!(
                "  {{\"target\": \"{}\", \"seconds\": {}, \"executions\": {}, \"result\": \"{}\"}}",
                r.target, r.seconds, r.executions, r.result
            ))
            .collect::<Vec<_>>()
            .join(",\n")
    );
    std::fs::write(&summary, json)
        .with_context(|| format!("cannot write {}", summary.display()))?;
    println!(
        "{:<24} {:>8} {:>14}  result",
        "target", "seconds", "executions"
    );
    for r in &rows {
        println!(
            "{:<24} {:>8} {:>14}  {}",
            r.target, r.seconds, r.executions, r.result
        );
    }
    println!("(written to {})", summary.display());
    if let Some(bad) = rows.iter().find(|r| r.result != "no crash") {
        bail!("fuzz target {} failed: {}", bad.target, bad.result);
    }
    Ok(())
}

struct Row {
    target: String,
    seconds: u64,
    executions: u64,
    result: String,
}

fn run_one(bin: &Path, root: &Path, out_dir: &Path, target: &str, secs: u64) -> Result<Row> {
    let step = Step::loud(format!("fuzzing {target} for {secs} s"));
    let log = out_dir.join(format!("{target}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut fuzz = fuzz_command(bin, root);
    fuzz.args(["run", "--sanitizer", "none", target, "--"])
        .arg(format!("-max_total_time={secs}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::from(log_file));
    let start = Instant::now();
    let status = cmd::status(&mut fuzz)?;
    let seconds = start.elapsed().as_secs();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let executions = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let result = if status.success() && executions > 0 {
        "no crash".to_owned()
    } else if executions == 0 {
        format!("did not run ({status}); see {}", log.display())
    } else {
        format!(
            "crashed ({status}); see {} and fuzz/artifacts/{target}",
            log.display()
        )
    };
    step.done();
    Ok(Row {
        target: target.to_owned(),
        seconds,
        executions,
        result,
    })
}

fn fuzz_command(bin: &Path, root: &Path) -> Command {
    let mut fuzz = Command::new(bin);
    fuzz.current_dir(root)
        // cargo runs `cargo-fuzz fuzz …` for `cargo fuzz …`; we call the binary the same way.
        .arg("fuzz")
        .env("RUSTC_BOOTSTRAP", "1");
    fuzz
}

fn list(bin: &Path, root: &Path) -> Result<Vec<String>> {
    let mut fuzz = fuzz_command(bin, root);
    fuzz.arg("list");
    let output = fuzz
        .output()
        .with_context(|| format!("cannot run {}", cmd::display(&fuzz)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd::display(&fuzz),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `${CARGO_HOME}/mesh-tools/cargo-fuzz/bin/cargo-fuzz`, installed when missing or another version.
fn ensure() -> Result<PathBuf> {
    let root = linker::cargo_home()?.join("mesh-tools/cargo-fuzz");
    let bin = root.join("bin/cargo-fuzz");
    let want = format!("cargo-fuzz {VERSION}");
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if have.as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    let step = Step::loud(format!(
        "installing cargo-fuzz {VERSION} into {} (about 1 min)",
        root.display()
    ));
    let mut cargo = Command::new("cargo");
    cargo
        .args([
            "install",
            &format!("cargo-fuzz@{VERSION}"),
            "--locked",
            "--force",
        ])
        .arg("--root")
        .arg(&root);
    cmd::run(&mut cargo)?;
    step.done();
    Ok(bin)
}
