//! `tbot`: the agent daemon (`start`) and `spiffe-inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use super::inspect;
use crate::daemon as start;

#[derive(Debug, Parser)]
#[command(
    name = "tbot",
    version = crate::VERSION,
    about = "A declarative machine & workload identity agent",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: load the documents, join, and serve the Workload API until SIGTERM.
    Start {
        /// A directory of documents; repeatable. Default: /etc/tbot.d (unless -c is given).
        #[arg(long = "config-dir", value_name = "DIR")]
        config_dirs: Vec<PathBuf>,
        /// One more document file, such as the guide's /etc/tbot.yaml.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log as text lines or JSON objects.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Log at debug level.
        #[arg(short = 'd', long)]
        debug: bool,
        /// Serve /livez, /readyz and /metrics here (overrides the agent config's `diag_addr`).
        #[arg(long, value_name = "ADDR")]
        diag_addr: Option<std::net::SocketAddr>,
        /// Write every file output (`workload-identity-x509`, `workload-identity-jwt`) once, run
        /// their `on_update`, and exit: 0 when all were written, 1 naming those that failed (for CI
        /// jobs and init containers). Sockets are not served.
        #[arg(long)]
        oneshot: bool,
    },
    /// Install tbot as a service.
    #[command(subcommand)]
    Install(Install),
    /// Fetch and print the SVIDs and bundles the Workload API gives this process.
    SpiffeInspect {
        /// The Workload API socket. Default: $SPIFFE_ENDPOINT_SOCKET.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", value_name = "unix:///PATH")]
        path: String,
        /// Also fetch JWT-SVIDs for this audience; repeatable.
        #[arg(long = "audience", value_name = "AUD")]
        audiences: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Install {
    /// Print (or `--write`) a systemd unit that runs `tbot start`.
    Systemd(super::install::SystemdArgs),
}

/// Sets up logging; returns how to switch debug logging on and off later (`debug:` in the agent
/// config), unless `RUST_LOG` decides the levels.
fn init_logging(format: LogFormat, debug: bool) -> Option<crate::daemon::LogLevel> {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let level = |debug: bool| EnvFilter::new(if debug { "debug" } else { "info" });
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| level(debug)));
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    if fixed {
        return None;
    }
    Some(std::sync::Arc::new(move |config_debug: bool| {
        let _ = handle.modify(|f| *f = level(debug || config_debug));
    }))
}

/// The daemon's blocking threads. Blocking work is short (loading documents, writing records;
/// attesting a caller from /proc runs on threads of its own, and here only when none of those takes
/// it in time). The default allows 512 threads: a burst then starts hundreds, which exit 10 s later,
/// and the allocator keeps what each one touched. 16 bound that churn.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// The open-file limit the installed unit sets (`LimitNOFILE`).
pub const OPEN_FILES: u64 = 524_288;

/// Raises the soft limit on open files towards the hard one, up to the installed unit's
/// `LimitNOFILE` ([`OPEN_FILES`]): an issuer holds one connection per agent and a daemon one per
/// Workload API client, and a `tbot start` run by hand inherits a shell's limit (often 1,024).
/// Children (hooks) inherit the raised limit, as they do under the unit. Returns the limits before
/// and after when it moved, or why it could not.
fn raise_open_files_limit() -> Option<Result<(u64, u64), rustix::io::Errno>> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current?;
    let target = limit.maximum.unwrap_or(OPEN_FILES).min(OPEN_FILES);
    if current >= target {
        return None;
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: limit.maximum,
    };
    Some(setrlimit(Resource::Nofile, raised).map(|()| (current, target)))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .expect("a tokio runtime");
    match cli.command {
        Command::Start {
            mut config_dirs,
            config,
            log_format,
            debug,
            diag_addr,
            oneshot,
        } => {
            let log_level = init_logging(log_format, debug);
            match raise_open_files_limit() {
                Some(Ok((was, now))) => tracing::debug!(was, now, "raised the open-file limit"),
                Some(Err(e)) => tracing::warn!(
                    error = %e,
                    "cannot raise the open-file limit; an issuer with many agents may run out of \
                     files: raise it (`ulimit -n`, or LimitNOFILE in the unit) before starting"
                ),
                None => {}
            }
            if config_dirs.is_empty() && config.is_none() {
                config_dirs.push(super::args::DEFAULT_DIR.into());
            }
            runtime.block_on(start::run(start::StartOptions {
                config_dirs,
                config_file: config,
                diag_addr,
                log_level,
                oneshot,
            }))
        }
        Command::SpiffeInspect { path, audiences } => runtime.block_on(inspect::run(path, audiences)),
        Command::Install(Install::Systemd(args)) => super::install::run(&args),
    }
}
