//! The `tbot` binary: the agent. Its commands arrive with the issues that build them.
use clap::Parser;

/// tbot: a declarative machine & workload identity agent.
#[derive(Debug, Parser)]
#[command(name = "tbot", version, about, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
