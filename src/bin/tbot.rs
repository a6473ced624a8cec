//! The `tbot` binary: the agent. See `tbot::cli::tbot`.
/// mimalloc, not glibc's malloc: tbot's tasks move between tokio's worker threads, so memory is
/// often freed on another thread than the one that allocated it, and glibc serialises such frees on
/// arena locks (in a profile of 256 Workload API clients, about a tenth of all CPU was futex calls
/// from malloc and free). Built without transparent huge pages (`no_thp`): with them an idle
/// daemon took about 10 MiB more and joins were slower. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tbot::cli::tbot::main()
}
