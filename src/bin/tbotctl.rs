//! The `tbotctl` binary; everything lives in `tbot::cli::tbotctl`.
fn main() -> std::process::ExitCode {
    tbot::cli::tbotctl::main()
}
