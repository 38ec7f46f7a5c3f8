//! Developer commands (`cargo xtask <command>`): build the eBPF object, install system packages,
//! lint, test with kernel-suite accounting, and run the demo. A fresh machine needs nothing else.

mod bench;
mod cmd;
mod demo;
mod deps;
mod ebpf;
mod fuzz;
mod linker;
mod lint;
mod step;
mod test_suite;
mod toolchain;
mod workspace;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Developer commands of the mesh workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/mesh); installs rust-src and
    /// bpf-linker for the active toolchain when missing.
    BuildEbpf {
        /// Release build: the default and the only profile (unoptimised BPF does not link).
        #[arg(long)]
        release: bool,
    },
    /// Install the Debian packages tests, benchmarks and the demo use, and mount bpffs.
    InstallDeps,
    /// build-ebpf, then rustfmt --check and clippy -D warnings (host crates, then mesh-ebpf).
    Lint,
    /// install-deps, build-ebpf, then `cargo test --workspace --exclude mesh-ebpf [ARGS]`.
    ///
    /// Prints how many kernel tests ran and skipped; with CI=true a skipped or empty kernel suite
    /// fails. Pass test-binary flags after a second `--`: `cargo xtask test -- -- --nocapture`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// install-deps, build-ebpf, then the suite's benchmark (`mesh-bench`, release) as root;
    /// writes `target/bench/<suite>.json` and prints a table.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        suite: bench::Suite,
        /// Fewer repetitions and shorter runs: a smoke check in under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Coverage-guided fuzzing: every libFuzzer target in `fuzz/` (or the named ones) for SECS
    /// seconds each, via the pinned cargo-fuzz; writes `target/fuzz/summary.json`.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// install-deps, build-ebpf, then run the `mesh-demo` binary as root (re-runs under sudo).
    Demo {
        /// Arguments for mesh-demo.
        #[arg(last = true)]
        demo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let start = Instant::now();
    let (name, result) = match cli.command {
        Command::BuildEbpf { release: _ } => (
            "build-ebpf",
            ebpf::Toolchain::prepare()
                .and_then(|toolchain| ebpf::build(&toolchain))
                .map(drop),
        ),
        Command::InstallDeps => ("install-deps", deps::install()),
        Command::Lint => ("lint", lint::run()),
        Command::Test { cargo_args } => ("test", test_suite::run(&cargo_args)),
        Command::Fuzz { secs, targets } => ("fuzz", fuzz::run(&targets, secs)),
        Command::Demo { demo_args } => ("demo", demo::run(&demo_args)),
        Command::Bench { suite, quick } => ("bench", bench::run(suite, quick)),
    };
    let took = step::format_duration(start.elapsed());
    match result {
        Ok(()) => {
            println!("==> {name} finished ({took})");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("==> {name} failed ({took})");
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
