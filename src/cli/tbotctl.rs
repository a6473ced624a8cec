//! `tbotctl`: validate documents and print their schemas (diff, apply, get and status come with the
//! daemon's admin API).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::manifest::render;
use crate::manifest::{self, Input, schema};
use crate::resource::Kind;

/// The directory read when no `--dir` or `-f` is given.
pub const DEFAULT_DIR: &str = "/etc/tbot.d";

#[derive(Debug, Parser)]
#[command(name = "tbotctl", version, about = "Check and manage the documents of a tbot agent")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check documents: syntax, schemas, templates, SPIFFE IDs and references between documents.
    /// Exit 0 when valid, 1 when invalid, 2 on a usage or I/O error.
    Validate(ValidateArgs),
    /// Show what applying the documents would change: object diffs, runtime actions, the plan.
    /// Exit 0 when nothing changes, 1 when something does, 2 on an error (invalid input included).
    Diff(super::diff::DiffArgs),
    /// Write documents (`-f`) into the directory after validating them, and wait until the running
    /// daemon has converged: one line per object, `created|configured|unchanged`.
    Apply(super::admin_cmds::ApplyArgs),
    /// The running daemon's objects with their status (generation, conditions).
    Get(super::admin_cmds::GetArgs),
    /// The running daemon: trust domain, bot, listeners, objects not ready.
    Status(super::admin_cmds::DaemonArgs),
    /// Print the JSON Schema of a kind, or write every kind's schema to a directory.
    Schema(SchemaArgs),
    /// Rotate the CA or the JWT signing key now (a suspected key compromise): a successor is
    /// published at once and signs after `--grace`; the old key goes once what it signed expired.
    Rotate(super::admin_cmds::RotateArgs),
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    #[command(flatten)]
    input: InputArgs,
    /// `text` for people, `json` for editors and CI.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Args)]
struct SchemaArgs {
    /// The kind: agent_config, cluster, issuer, bot, token, role or workload_identity.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    kind: Option<String>,
    /// Every kind, written as `<kind>.schema.json` into `--out`.
    #[arg(long, requires = "out")]
    all: bool,
    /// The directory to write schemas into (with `--all`).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Runs `tbotctl` with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Diff(args) => super::diff::run(&args),
        Command::Apply(args) => block_on(super::admin_cmds::apply(&args)),
        Command::Get(args) => block_on(super::admin_cmds::get(&args)),
        Command::Status(args) => block_on(super::admin_cmds::status(&args)),
        Command::Schema(args) => schema_command(&args),
        Command::Rotate(args) => block_on(super::admin_cmds::rotate(&args)),
    }
}

fn block_on(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let loaded = match manifest::load(&args.input.inputs()) {
        Ok(loaded) => loaded,
        Err(diagnostic) => {
            eprint!("{}", render::diagnostic(&diagnostic));
            return ExitCode::from(2);
        }
    };
    match args.output {
        Output::Text => {
            for d in &loaded.diagnostics {
                print!("{}", render::diagnostic(d));
            }
            println!("{}", render::summary(&loaded));
        }
        Output::Json => {
            let report = render::json_report(&loaded);
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("JSON values serialize")
            );
        }
    }
    ExitCode::from(u8::from(loaded.has_errors()))
}

fn schema_command(args: &SchemaArgs) -> ExitCode {
    let pretty = |kind: Kind| {
        let mut text = serde_json::to_string_pretty(&schema::schema(kind)).expect("schemas serialize");
        text.push('\n');
        text
    };
    if let Some(name) = &args.kind {
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == name) else {
            let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            eprintln!(
                "error: unknown kind `{name}`\n  = hint: the kinds are {}",
                kinds.join(", ")
            );
            return ExitCode::from(2);
        };
        print!("{}", pretty(kind));
        return ExitCode::SUCCESS;
    }
    let out = args.out.as_ref().expect("clap requires --out with --all");
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!(
            "error: cannot create {}: {e}\n  = hint: check the path and its permissions",
            out.display()
        );
        return ExitCode::from(2);
    }
    for kind in Kind::ALL {
        let path = out.join(format!("{kind}.schema.json"));
        if let Err(e) = std::fs::write(&path, pretty(kind)) {
            eprintln!(
                "error: cannot write {}: {e}\n  = hint: check the path and its permissions",
                path.display()
            );
            return ExitCode::from(2);
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
