//! The `tbot` binary: the agent. See `tbot::cli::tbot`.
/// mimalloc, not glibc's malloc: tbot's tasks move between tokio's worker threads, so memory is
/// often freed on another thread than the one that allocated it, and glibc serialises such frees on
/// the allocating thread's arena lock (in a profile of 256 Workload API clients, a tenth of all
/// CPU was futex calls from malloc and free). Built without transparent huge pages (`no_thp`), which
/// cost an idle daemon 9 MiB and the issuer throughput. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tbot::cli::tbot::main()
}
