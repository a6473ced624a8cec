//! `tbotctl`: the command and its subcommands, one file each (`diff`, `apply`, `get`, `status`,
//! `rotate`); `validate` and `schema` are here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod apply;
mod diff;
mod get;
mod issued;
mod lock;
mod revoke;
mod rotate;
mod status;

use crate::cli::args::{DaemonArgs, InputArgs, block_on};
use crate::cli::args::{out, outln};
use crate::manifest::render;
use crate::manifest::{self, schema};
use crate::resource::Kind;

#[derive(Debug, Parser)]
#[command(name = "tbotctl", version = crate::VERSION, about = "Check and manage the documents of a tbot agent")]
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
    Diff(diff::DiffArgs),
    /// Write documents (`-f`) into the directory after validating them, and wait until the running
    /// daemon has converged: one line per object, `created|configured|unchanged`.
    Apply(apply::ApplyArgs),
    /// The running daemon's objects with their status (generation, conditions).
    Get(get::GetArgs),
    /// The running daemon: trust domain, bot, listeners, objects not ready.
    Status(DaemonArgs),
    /// Print the JSON Schema of a kind, or write every kind's schema to a directory.
    Schema(SchemaArgs),
    /// Rotate the CA or the JWT signing key now (a suspected key compromise): a successor is
    /// published at once and signs after `--grace`; the old key goes once what it signed expired.
    Rotate(rotate::RotateArgs),
    /// Revoke certificates whose keys leaked: by serial, or every still-valid one of a SPIFFE ID or
    /// a bot instance (from the issuance log). Writes a `revocation` document into the directory and
    /// waits until the daemon has applied it.
    Revoke(revoke::RevokeArgs),
    /// Lock a bot instance whose key leaked: its issuance, renewals and Watch stream are refused on
    /// every replica until `tbotctl unlock`.
    Lock(lock::LockArgs),
    /// Unlock a bot instance locked by hand (or after a copied identity was found and dealt with).
    Unlock(lock::LockArgs),
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
        Command::Diff(args) => diff::run(&args),
        Command::Apply(args) => block_on(apply::apply(&args)),
        Command::Get(args) => block_on(get::get(&args)),
        Command::Status(args) => block_on(status::status(&args)),
        Command::Schema(args) => schema_command(&args),
        Command::Rotate(args) => block_on(rotate::rotate(&args)),
        Command::Revoke(args) => block_on(revoke::revoke(&args)),
        Command::Lock(args) => block_on(lock::lock(&args, false)),
        Command::Unlock(args) => block_on(lock::lock(&args, true)),
    }
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
                out!("{}", render::diagnostic(d));
            }
            outln!("{}", render::summary(&loaded));
        }
        Output::Json => {
            let report = render::json_report(&loaded);
            outln!(
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
        out!("{}", pretty(kind));
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
        outln!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
