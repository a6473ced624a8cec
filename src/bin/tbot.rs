//! The `tbot` binary: the agent. See `tbot::cli::tbot`.
fn main() -> std::process::ExitCode {
    tbot::cli::tbot::main()
}
