//! What every command line shares: where documents come from, how to reach the daemon, and how an
//! error is printed (cause first, then what to do next). A leaf: it imports no other `cli` file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::admin::proto::admin_client::AdminClient;
use crate::manifest::{self, Input, render};

/// The directory read when no `--dir` or `-f` is given.
pub const DEFAULT_DIR: &str = "/etc/tbot.d";

/// Where documents come from.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// A directory of documents (every *.yaml and *.yml in it); repeatable. Default: /etc/tbot.d.
    #[arg(long = "dir", value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// A document file; repeatable.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
}

impl InputArgs {
    /// One directory.
    pub fn dir(dir: PathBuf) -> InputArgs {
        InputArgs {
            dirs: vec![dir],
            files: vec![],
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn inputs(&self) -> Vec<Input> {
        if self.dirs.is_empty() && self.files.is_empty() {
            return vec![Input::Dir(DEFAULT_DIR.into())];
        }
        let dirs = self.dirs.iter().cloned().map(Input::Dir);
        dirs.chain(self.files.iter().cloned().map(Input::File)).collect()
    }
}

/// How to reach the daemon.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// The daemon's admin socket; by default found from the directory's agent config.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

pub fn fail(message: impl std::fmt::Display, hint: &str) -> ExitCode {
    eprintln!("error: {message}\n  = hint: {hint}");
    ExitCode::from(2)
}

impl DaemonArgs {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.admin_socket {
            return Ok(path.clone());
        }
        // Nothing given and no default directory: the daemon runs elsewhere, say where to point.
        if self.input.dirs().is_empty() && self.input.files().is_empty() && !Path::new(DEFAULT_DIR).is_dir() {
            return Err(format!(
                "no daemon to talk to: {DEFAULT_DIR} (where the daemon's documents are by default) does not exist"
            ));
        }
        let loaded = manifest::load(&self.input.inputs()).map_err(|d| render::diagnostic(&d))?;
        crate::admin::socket_for(&loaded.state).ok_or_else(|| {
            "no agent config and no `issuer` document in these documents to find the admin socket from".to_owned()
        })
    }

    pub async fn connect(&self) -> Result<AdminClient<tonic::transport::Channel>, ExitCode> {
        let socket = self.socket().map_err(|e| {
            fail(
                e.trim_end(),
                "pass --dir with the directory the daemon was started with (`tbot start --config-dir DIR`), or \
                     --admin-socket PATH",
            )
        })?;
        match crate::workload_api::client::connect(&socket.display().to_string()).await {
            Ok(channel) => Ok(AdminClient::new(channel)),
            Err(e) => Err(fail(
                e,
                "is `tbot start` running with this directory? (`tbotctl diff` works without a daemon)",
            )),
        }
    }
}

pub fn explain(status: tonic::Status) -> ExitCode {
    // The daemon's own words; the gRPC code decides only the hint.
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            fail(message, "run tbotctl as root or as the daemon's user")
        }
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => fail(
            message,
            "is the daemon still running? its log says more (`journalctl -u tbot` or its terminal)",
        ),
        // The daemon's own message says what to do next.
        _ => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

pub fn block_on(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Writes to standard output. A reader that went away (`tbotctl get | head -1`) ends the command
/// quietly with 141, as a closed pipe ends any Unix tool, instead of a panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to standard output: {e}\n  = hint: check where the output goes");
        std::process::exit(2);
    }
}

/// `print!` that ends the command quietly on a closed pipe (see [`write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::args::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` that ends the command quietly on a closed pipe (see [`write_stdout`]).
macro_rules! outln {
    () => {
        $crate::cli::args::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::args::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};
