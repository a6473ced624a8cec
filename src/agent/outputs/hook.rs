//! `on_update`: a signal to the pid in `pid_file`, or a command run with a timeout.

use std::path::PathBuf;
use std::time::Duration;

use crate::resource::agent::{OnUpdate, SignalName};

/// How long `exec` may run by default.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why `on_update` failed: each says what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "cannot read the pid file {}: {source}; is the process running, and is `pid_file` its pid file?",
        path.display()
    )]
    PidFile { path: PathBuf, source: std::io::Error },
    #[error(
        "{} does not hold a pid (`{text}`); point `pid_file` at the file the process writes its pid to",
        path.display()
    )]
    NotAPid { path: PathBuf, text: String },
    #[error(
        "cannot send {signal} to pid {pid} (from {}): {source}; the process may have exited (a stale pid file), \
         or tbot may not signal it (run tbot as its user or as root)",
        path.display()
    )]
    Signal {
        signal: SignalName,
        pid: i32,
        path: PathBuf,
        source: rustix::io::Errno,
    },
    #[error(
        "`{command}` ran longer than {timeout:?} and was killed; make it return sooner, or raise `on_update.timeout`"
    )]
    Timeout { command: String, timeout: Duration },
    #[error("cannot run `{command}`: {source}; write the program's absolute path in `on_update.exec`")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}; run it by hand to see why")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        /// The end of what it said on stderr: the error is usually last.
        stderr: String,
    },
}

/// Sends the signal, or runs the command. An error says what failed and what to check.
pub async fn run_hook(hook: &OnUpdate) -> Result<(), HookError> {
    if let (Some(signal), Some(pid_file)) = (hook.signal, &hook.pid_file) {
        let text = std::fs::read_to_string(pid_file).map_err(|source| HookError::PidFile {
            path: pid_file.clone(),
            source,
        })?;
        let pid = text
            .trim()
            .parse::<i32>()
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| HookError::NotAPid {
                path: pid_file.clone(),
                text: text.trim().to_owned(),
            })?;
        return rustix::process::kill_process(pid, signal_of(signal)).map_err(|source| HookError::Signal {
            signal,
            pid: pid.as_raw_nonzero().get(),
            path: pid_file.clone(),
            source,
        });
    }
    let Some((program, args)) = hook.exec.split_first() else {
        return Ok(());
    };
    let timeout = hook.timeout.map(|t| t.as_std()).unwrap_or(HOOK_TIMEOUT);
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let command = hook.exec.join(" ");
    match tokio::time::timeout(timeout, child).await {
        Err(_) => Err(HookError::Timeout { command, timeout }),
        Ok(Err(source)) => Err(HookError::Spawn { command, source }),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            // The end of what it said: the error is usually last.
            let start = stderr.char_indices().rev().nth(299).map_or(0, |(i, _)| i);
            Err(HookError::Failed {
                command,
                status: out.status,
                stderr: stderr[start..].to_owned(),
            })
        }
    }
}

fn signal_of(signal: SignalName) -> rustix::process::Signal {
    use rustix::process::Signal;
    match signal {
        SignalName::SIGHUP => Signal::HUP,
        SignalName::SIGUSR1 => Signal::USR1,
        SignalName::SIGUSR2 => Signal::USR2,
        SignalName::SIGINT => Signal::INT,
        SignalName::SIGQUIT => Signal::QUIT,
        SignalName::SIGTERM => Signal::TERM,
        SignalName::SIGWINCH => Signal::WINCH,
    }
}

impl crate::error::Explain for HookError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // Each message says what to check.
        "".into()
    }
}
