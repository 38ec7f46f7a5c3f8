//! Process metrics under Prometheus' standard names (`process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, `process_open_fds`, `process_start_time_seconds`, …, what every
//! client library's process collector exports and dashboards expect), read from `/proc/self` at
//! scrape time, and the tokio runtime's basics (`mesh_runtime_*`).

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

/// What `/proc/self` says now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// The fields of `/proc/<pid>/stat` after the command (which may hold spaces and parentheses):
/// index 0 is field 3 (`state`) of proc(5).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// Parses `/proc/self/stat` and the boot time from `/proc/stat` (`btime`).
fn parse(stat: &str, proc_stat: &str, ticks: f64, page: u64) -> Option<ProcessStats> {
    let f = stat_fields(stat)?;
    // proc(5): utime 14, stime 15, num_threads 20, starttime 22, vsize 23, rss 24 (1-based).
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let btime = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())?;
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds: 0,
    })
}

/// Reads this process's stats (`None` where `/proc` is unreadable).
#[must_use]
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no memory effects.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mut s = parse(
        &stat,
        &proc_stat,
        ticks.max(1) as f64,
        page.max(1).cast_unsigned(),
    )?;
    s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        s.max_fds = lim.rlim_cur;
    }
    Some(s)
}

/// Encodes the process and runtime metrics.
pub fn encode(enc: &mut DescriptorEncoder, stats: Option<&ProcessStats>) -> fmt::Result {
    if let Some(s) = stats {
        ConstCounter::new(s.cpu_seconds).encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        super::gauge(
            enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            s.resident_bytes as f64,
        )?;
        super::gauge(
            enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            s.virtual_bytes as f64,
        )?;
        super::gauge(
            enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            s.start_time_seconds,
        )?;
        super::gauge(
            enc,
            "process_open_fds",
            "Open file descriptors.",
            s.open_fds as f64,
        )?;
        super::gauge(
            enc,
            "process_max_fds",
            "Most file descriptors the process may open.",
            s.max_fds as f64,
        )?;
        super::gauge(
            enc,
            "process_threads",
            "OS threads of the process.",
            s.threads as f64,
        )?;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let m = rt.metrics();
        super::gauge(
            enc,
            "mesh_runtime_workers",
            "Worker threads of the agent's tokio runtime.",
            m.num_workers() as f64,
        )?;
        super::gauge(
            enc,
            "mesh_runtime_alive_tasks",
            "Tasks alive in the agent's tokio runtime.",
            m.num_alive_tasks() as f64,
        )?;
        super::gauge(
            enc,
            "mesh_runtime_global_queue_depth",
            "Tasks waiting in the runtime's global queue (a busy runtime queues here).",
            m.global_queue_depth() as f64,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_parsed_past_a_command_with_spaces_and_parentheses() {
        let stat = "4242 (mesh (agent) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 \
                    7 0 12000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 \
                    0 0 0 0 0";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let s = parse(stat, proc_stat, 100.0, 4096).unwrap();
        assert_eq!(
            s,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 2560 * 4096,
                virtual_bytes: 104_857_600,
                start_time_seconds: 1_700_000_120.0,
                threads: 7,
                open_fds: 0,
                max_fds: 0,
            }
        );
        assert!(parse("garbage", proc_stat, 100.0, 4096).is_none());
    }

    #[test]
    fn this_process_reads() {
        let s = read().unwrap();
        assert!(s.resident_bytes > 0 && s.open_fds > 0 && s.max_fds > 0 && s.threads > 0);
        assert!(s.start_time_seconds > 1_600_000_000.0);
    }
}
