//! Running programs and closures inside a node's or pod's network namespace and cgroup.
//!
//! A child is moved into the cgroup first (by writing its pid to `cgroup.procs`) and then into the
//! network namespace with `setns`; the namespace file is opened before `fork`. Nothing here uses
//! `ip netns exec`, which would also remount `/sys`.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Read as _};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How long [`Sandbox::output`] and [`Sandbox::run`] wait before killing the child.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A place to run things: a network namespace plus the cgroup v2 directory processes join.
///
/// [`crate::NodeHandle`] and [`crate::PodHandle`] dereference to one, so `pod.command(..)`,
/// `pod.run(..)` and friends are these methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    label: String,
    netns: String,
    netns_path: PathBuf,
    cgroup: PathBuf,
}

/// Packet and byte counters of one interface (`ip -s link`'s `stats64`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfaceStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets dropped on send.
    pub tx_dropped: u64,
}

impl Sandbox {
    pub(crate) fn new(label: String, netns: String, cgroup: PathBuf) -> Self {
        let netns_path = Path::new(crate::cluster::NETNS_DIR).join(&netns);
        Self {
            label,
            netns,
            netns_path,
            cgroup,
        }
    }

    /// A human label for errors, e.g. `pod a1` or `node a`.
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The network namespace's name (for `ip -n`).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The network namespace's file, `/run/netns/<netns>`.
    #[must_use]
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The cgroup v2 directory processes started here join.
    #[must_use]
    pub fn exec_cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A [`Command`] whose child joins this cgroup and then this network namespace before `exec`.
    ///
    /// If the namespace file cannot be opened, spawning fails with that error.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // Opened before fork; std opens with O_CLOEXEC so the program never inherits it.
        let netns = File::open(&self.netns_path);
        let procs = CString::new(
            self.cgroup
                .join("cgroup.procs")
                .as_os_str()
                .as_bytes()
                .to_vec(),
        );
        let hook = move || -> io::Result<()> {
            let netns = netns.as_ref().map_err(copy_os_error)?;
            let procs = procs
                .as_ref()
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: both helpers only make async-signal-safe system calls on valid fds/strings.
            unsafe {
                join_cgroup_raw(procs)?;
                setns_raw(netns.as_raw_fd())
            }
        };
        // SAFETY: the hook allocates nothing and only calls open/write/close/setns.
        unsafe {
            cmd.pre_exec(hook);
        }
        cmd
    }

    /// Spawns `cmd` (made by [`Self::command`]) with stdin, stdout and stderr piped; the child is
    /// killed when the returned [`PodChild`] drops.
    pub fn spawn(&self, cmd: Command) -> Result<PodChild> {
        PodChild::spawn(self.label.clone(), cmd, true)
    }

    /// Runs `cmd` to completion (stdin closed) with [`DEFAULT_TIMEOUT`].
    pub fn output(&self, cmd: Command) -> Result<Output> {
        self.output_timeout(cmd, DEFAULT_TIMEOUT)
    }

    /// Runs `cmd` to completion (stdin closed); kills it and fails after `timeout`.
    pub fn output_timeout(&self, cmd: Command, timeout: Duration) -> Result<Output> {
        PodChild::spawn(self.label.clone(), cmd, false)?.finish(timeout)
    }

    /// Runs `program args…` here, fails unless it exits 0, and returns its stdout.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let shown = format!("{cmd:?}");
        let out = self.output(cmd)?;
        if !out.status.success() {
            bail!(
                "{shown} in {} failed ({}): {}",
                self.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` in a forked child that joined this cgroup and network namespace, and returns its
    /// result (sent back as JSON). Waits [`DEFAULT_TIMEOUT`].
    ///
    /// The child is a fork of a multi-threaded process: keep `f` to plain blocking code (it may
    /// build its own tokio runtime, but not use the parent's).
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        self.run_timeout(DEFAULT_TIMEOUT, f)
    }

    /// [`Self::run`] with an explicit timeout; on expiry the child is killed and an error returned.
    /// A panic in `f` becomes an error carrying the panic message.
    pub fn run_timeout<T, F>(&self, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        let netns = File::open(&self.netns_path).with_context(|| {
            format!(
                "failed to open netns {} of {}",
                self.netns_path.display(),
                self.label
            )
        })?;
        let procs_path = self.cgroup.join("cgroup.procs");
        let procs = CString::new(procs_path.as_os_str().as_bytes().to_vec())
            .with_context(|| format!("bad cgroup path {}", procs_path.display()))?;
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("failed to create the result pipe for a pod closure")?;
        // SAFETY: the child only runs `child_body`, which ends in `_exit` and never returns.
        match unsafe { nix::unistd::fork() }
            .with_context(|| format!("failed to fork for a closure in {}", self.label))?
        {
            ForkResult::Child => {
                drop(rd);
                let code = child_body(f, &procs, &netns, &wr);
                // SAFETY: `_exit` skips atexit handlers and destructors of the parent's state.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(wr);
                let bytes = collect_child(&self.label, child, &rd, timeout)?;
                decode_child(&self.label, &bytes)
            }
        }
    }

    /// Counters of interface `ifname` in this namespace (read with `ip -j -s link`, because
    /// `/sys/class/net` shows the namespace that mounted sysfs, not ours).
    pub fn iface_stats(&self, ifname: &str) -> Result<IfaceStats> {
        let json = crate::ip::ip_in(&self.netns, &["-j", "-s", "link", "show", "dev", ifname])?;
        parse_iface_stats(&json).with_context(|| {
            format!(
                "failed to parse `ip -j -s link show dev {ifname}` in {}",
                self.label
            )
        })
    }

    /// Sets a sysctl (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`) inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        set_sysctls(&self.netns_path, &[(key, value)]).with_context(|| format!("in {}", self.label))
    }
}

/// Writes `/proc/sys/<key>` values from a thread that entered the namespace: net sysctls resolve
/// through the calling thread's namespace, so neither the process nor the host is touched.
pub(crate) fn set_sysctls(netns_path: &Path, items: &[(&str, &str)]) -> Result<()> {
    let file = File::open(netns_path)
        .with_context(|| format!("failed to open netns {}", netns_path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("failed to setns into {}", netns_path.display()))?;
                for (key, value) in items {
                    let rel = if key.contains('/') {
                        (*key).to_owned()
                    } else {
                        key.replace('.', "/")
                    };
                    let path = Path::new("/proc/sys").join(rel);
                    std::fs::write(&path, value).with_context(|| {
                        format!(
                            "failed to set {} = {value} in {}",
                            path.display(),
                            netns_path.display()
                        )
                    })?;
                }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow!("sysctl thread panicked"))?
    })
}

fn parse_iface_stats(json: &str) -> Result<IfaceStats> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let stats = v
        .get(0)
        .and_then(|l| l.get("stats64"))
        .context("no stats64 in output")?;
    let get = |dir: &str, key: &str| {
        stats
            .get(dir)
            .and_then(|d| d.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Ok(IfaceStats {
        rx_packets: get("rx", "packets"),
        rx_bytes: get("rx", "bytes"),
        rx_dropped: get("rx", "dropped"),
        tx_packets: get("tx", "packets"),
        tx_bytes: get("tx", "bytes"),
        tx_dropped: get("tx", "dropped"),
    })
}

fn copy_os_error(e: &io::Error) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ENOENT))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`.
///
/// Async-signal-safe: usable between `fork` and `exec`.
unsafe fn join_cgroup_raw(procs: &CStr) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 20];
    // SAFETY: getpid has no preconditions.
    let digits = format_pid(unsafe { libc::getpid() }, &mut buf);
    // SAFETY: `fd` is open and `digits` is a valid buffer.
    let n = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` was opened above.
    unsafe { libc::close(fd) };
    if n < 0 { Err(err) } else { Ok(()) }
}

/// Enters the network namespace `fd` refers to. Async-signal-safe.
unsafe fn setns_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads the fd.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Decimal digits of `pid` without allocating.
fn format_pid(pid: libc::pid_t, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = i64::from(pid).unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// What a forked closure sends back.
#[derive(Serialize, Deserialize)]
enum ChildMsg {
    Ok(serde_json::Value),
    Panic(String),
    Setup(String),
}

/// The forked child's whole life; returns the exit code. Never unwinds.
fn child_body<T, F>(f: F, procs: &CStr, netns: &File, wr: &OwnedFd) -> i32
where
    F: FnOnce() -> T,
    T: Serialize,
{
    let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: plain system calls on a valid path and fd.
        if let Err(e) = unsafe { join_cgroup_raw(procs) } {
            return ChildMsg::Setup(format!(
                "failed to join cgroup ({}): {e}",
                procs.to_string_lossy()
            ));
        }
        // SAFETY: as above.
        if let Err(e) = unsafe { setns_raw(netns.as_raw_fd()) } {
            return ChildMsg::Setup(format!("failed to setns: {e}"));
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(value) => match serde_json::to_value(&value) {
                Ok(v) => ChildMsg::Ok(v),
                Err(e) => ChildMsg::Setup(format!("closure result did not serialize: {e}")),
            },
            Err(payload) => ChildMsg::Panic(panic_message(payload.as_ref())),
        }
    }))
    .unwrap_or_else(|_| ChildMsg::Setup("panic while reporting the result".to_owned()));
    let Ok(body) = serde_json::to_vec(&msg) else {
        return 3;
    };
    let mut frame = (body.len() as u64).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut rest = frame.as_slice();
    while !rest.is_empty() {
        // SAFETY: `wr` is the open write end of the pipe; `rest` is a valid buffer.
        let n = unsafe { libc::write(wr.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return 4;
        }
        rest = &rest[n.unsigned_abs()..];
    }
    0
}

/// The text of a panic payload (`&str` or `String`), if it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Length of a complete `[u64 LE length][body]` frame at the start of `buf`, if there is one.
fn complete_frame(buf: &[u8]) -> Option<&[u8]> {
    let len_bytes: [u8; 8] = buf.get(..8)?.try_into().ok()?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
    buf.get(8..8 + len)
}

/// Reads the child's frame and reaps it. Does not rely on EOF: children forked concurrently by
/// other test threads may hold a copy of the write end.
fn collect_child(label: &str, pid: Pid, rd: &OwnedFd, timeout: Duration) -> Result<Vec<u8>> {
    let fd = rd.as_raw_fd();
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut eof = false;
    let mut status: Option<WaitStatus> = None;
    loop {
        eof = eof || drain(fd, &mut buf)?;
        if status.is_none() {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s) => {
                    status = Some(s);
                    // Everything it wrote is in the pipe now.
                    eof = eof || drain(fd, &mut buf)?;
                }
                Err(e) => bail!("waitpid for the closure child in {label} failed: {e}"),
            }
        }
        if let Some(s) = status {
            return match complete_frame(&buf) {
                Some(frame) => Ok(frame.to_vec()),
                None => bail!("closure child in {label} ended ({s:?}) without sending a result"),
            };
        }
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            bail!("closure in {label} timed out after {timeout:?}; killed it");
        }
        if eof {
            std::thread::sleep(Duration::from_millis(2));
        } else {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&raw mut pfd, 1, 10) };
        }
    }
}

/// Reads what is available; true on EOF.
fn drain(fd: RawFd, buf: &mut Vec<u8>) -> Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // SAFETY: reading into a stack buffer of the stated size.
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        match n {
            0 => return Ok(true),
            n if n > 0 => buf.extend_from_slice(&chunk[..n.unsigned_abs()]),
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e).context("failed to read a closure result"),
                }
            }
        }
    }
}

fn decode_child<T: DeserializeOwned>(label: &str, frame: &[u8]) -> Result<T> {
    let msg: ChildMsg = serde_json::from_slice(frame)
        .with_context(|| format!("bad result frame from a closure in {label}"))?;
    match msg {
        ChildMsg::Ok(v) => serde_json::from_value(v)
            .with_context(|| format!("closure result from {label} did not deserialize")),
        ChildMsg::Panic(m) => bail!("closure in {label} panicked: {m}"),
        ChildMsg::Setup(m) => bail!("closure in {label} could not start: {m}"),
    }
}

/// A process started in a node or pod. Killed (SIGKILL) and reaped on drop.
///
/// Stdout is read by a thread into lines ([`Self::next_line`], [`Self::wait_for_line`]);
/// stderr is collected into a buffer ([`Self::stderr_text`]).
#[derive(Debug)]
pub struct PodChild {
    label: String,
    program: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Vec<u8>>,
    stdout_thread: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl PodChild {
    fn spawn(label: String, mut cmd: Command, keep_stdin: bool) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(if keep_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to spawn {cmd:?} in {label}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr_pipe = child.stderr.take().context("stderr not piped")?;
        let (tx, lines) = mpsc::channel();
        let stdout_thread = std::thread::Builder::new()
            .name(format!("{program}-stdout"))
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                loop {
                    let mut line = Vec::new();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .context("failed to start a stdout reader thread")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let stderr_thread = std::thread::Builder::new()
            .name(format!("{program}-stderr"))
            .spawn(move || {
                let mut pipe = stderr_pipe;
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]);
                }
            })
            .context("failed to start a stderr reader thread")?;
        Ok(Self {
            label,
            program,
            child,
            stdin,
            lines,
            stdout_thread: Some(stdout_thread),
            stderr,
            stderr_thread: Some(stderr_thread),
            status: None,
        })
    }

    /// The child's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote to stderr so far.
    #[must_use]
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// The next stdout line (without its newline).
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_owned()),
            Err(RecvTimeoutError::Timeout) => bail!(
                "{} in {} printed no line within {timeout:?}; stderr: {}",
                self.program,
                self.label,
                self.stderr_text().trim()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_timeout(Duration::from_secs(1)).ok();
                bail!(
                    "{} in {} closed stdout (exit {status:?}); stderr: {}",
                    self.program,
                    self.label,
                    self.stderr_text().trim()
                )
            }
        }
    }

    /// Skips stdout lines until one satisfies `pred`, and returns it.
    pub fn wait_for_line(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left)?;
            if pred(&line) {
                return Ok(line);
            }
        }
    }

    /// Waits for the line `ready` (what `meshpod serve` prints once listening).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for_line(|l| l.trim() == "ready", timeout)
            .map(|_| ())
    }

    /// The child's stdin, while open.
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.stdin.as_mut()
    }

    /// Closes the child's stdin (`meshpod hit --hold` then closes its connections and exits).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        kill(pid, signal)
            .with_context(|| format!("failed to signal {} in {}", self.program, self.label))
    }

    /// The exit status, if the child has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("try_wait")?;
        }
        Ok(self.status)
    }

    /// Waits for the child to exit; fails (leaving it running) after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_millis(1);
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} in {} still running after {timeout:?}",
                    self.program,
                    self.label
                );
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Closes stdin, waits up to `timeout` for exit (killing the child on expiry, which is an
    /// error), and returns the status with the stdout lines not yet consumed and all of stderr.
    pub fn finish(mut self, timeout: Duration) -> Result<Output> {
        self.close_stdin();
        let deadline = Instant::now() + timeout;
        let status = match self.wait_timeout(timeout) {
            Ok(s) => s,
            Err(e) => {
                self.kill();
                return Err(e.context(format!("stderr: {}", self.stderr_text().trim())));
            }
        };
        // The pipes close when the child exits, unless it left a grandchild holding them.
        let mut stdout = Vec::new();
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(200));
            match self.lines.recv_timeout(left) {
                Ok(line) => stdout.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        let grace = Instant::now() + Duration::from_millis(200);
        for handle in [self.stdout_thread.take(), self.stderr_thread.take()]
            .into_iter()
            .flatten()
        {
            while !handle.is_finished() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Kills (SIGKILL) and reaps the child; errors are ignored (it may be gone already).
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for PodChild {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_pids() {
        let mut buf = [0u8; 20];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
    }

    #[test]
    fn frames_are_length_prefixed() {
        let mut buf = 3u64.to_le_bytes().to_vec();
        assert!(complete_frame(&buf).is_none());
        buf.extend_from_slice(b"abc");
        assert_eq!(complete_frame(&buf), Some(&b"abc"[..]));
    }

    #[test]
    fn parses_ip_link_stats() {
        let json = r#"[{"ifname":"vp0","stats64":{"rx":{"bytes":400,"packets":4,"dropped":1},"tx":{"bytes":300,"packets":2,"dropped":0}}}]"#;
        let s = parse_iface_stats(json).unwrap();
        assert_eq!((s.rx_packets, s.rx_bytes, s.rx_dropped), (4, 400, 1));
        assert_eq!((s.tx_packets, s.tx_bytes), (2, 300));
    }
}
