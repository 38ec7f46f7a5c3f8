//! Running child processes with errors that name the command, its exit status and its output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context as _, Result, bail};

/// Renders a command as a shell line, with the environment it sets, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    let mut line = String::new();
    let inherited_path = std::env::var("PATH").unwrap_or_default();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        let mut value = value.to_string_lossy().replace('\x1f', "\\x1f");
        // `PATH=/x/bin:<the whole inherited PATH>` reads better as `PATH=/x/bin:$PATH`.
        if key == "PATH"
            && !inherited_path.is_empty()
            && let Some(prefix) = value.strip_suffix(&format!(":{inherited_path}"))
        {
            value = format!("{prefix}:$PATH");
        }
        let _ = write!(line, "{}={} ", key.to_string_lossy(), quote(&value));
    }
    line.push_str(&quote(&cmd.get_program().to_string_lossy()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(&arg.to_string_lossy()));
    }
    line
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%\\$".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdio (its output streams to the terminal) and returns its status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    println!("    $ {}", display(cmd));
    cmd.status().with_context(|| {
        format!(
            "could not start `{}`: is it installed and on PATH?",
            display(cmd)
        )
    })
}

/// Runs a command with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command silently and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!(
            "could not start `{}`: is it installed and on PATH?",
            display(cmd)
        )
    })?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed invalid UTF-8", display(cmd)))
}

/// Finds an executable on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective uid 0 (read from `/proc/self/status`, no libc needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .is_some_and(|effective| effective == "0")
    })
}

#[cfg(test)]
mod tests {
    use super::display;
    use std::process::Command;

    #[test]
    fn display_shows_env_and_quotes_odd_words() {
        let mut cmd = Command::new("cargo");
        cmd.env("CARGO_ENCODED_RUSTFLAGS", "-C\x1fdebuginfo=2")
            .args(["build", "a b"]);
        assert_eq!(
            display(&cmd),
            r"CARGO_ENCODED_RUSTFLAGS=-C\x1fdebuginfo=2 cargo build 'a b'"
        );
    }
}
