//! The benchmark report: every figure tbot promises, in one process, each row beside a floor measured
//! in the same run on the same machine, and the ratio (tbot's cost over the floor's: 1.00x is the
//! floor itself, higher is slower or bigger).
//!
//! ```text
//! cargo bench --bench report                      # the whole table (release build)
//! cargo bench --bench report -- --json FILE       # the same rows as JSON
//! cargo bench --bench report -- --markdown FILE   # the docs page (docs/benchmarks.md)
//! cargo bench --bench report -- --only mint,api   # some sections: mint load api edit scale streams fleet ha consumers containers
//! ```
//!
//! Without `--bench` (as `cargo test` and `cargo nextest` run it, as the test `smoke`) every
//! section runs once with small sizes, so the report cannot rot unnoticed.

mod api;
mod common;
mod consumers;
mod containers;
mod daemon;
// The tests' etcd cluster helper, shared (the benches use part of it).
#[allow(dead_code)]
#[path = "../../tests/common/etcd.rs"]
mod etcd;
mod fleet;
mod ha;
#[path = "../../tests/common/haproxy.rs"]
mod haproxy;
mod load;
mod mint;
// The tests' podman (its own storage, a busybox image, the API service), for the `containers` section.
#[path = "../../tests/common/podman.rs"]
mod podman;

use std::fmt::Write as _;
use std::time::Duration;

/// One line of the report.
pub struct Row {
    pub section: &'static str,
    pub measure: String,
    pub value: f64,
    pub unit: Unit,
    pub floor: String,
    pub floor_value: f64,
    /// tbot's cost over the floor's.
    pub ratio: f64,
}

#[derive(Clone, Copy)]
pub enum Unit {
    PerSecond,
    Micros,
    Millis,
    MiB,
    KiB,
    Count,
    /// CPU time over wall time: 1.0 is one core busy.
    Cores,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::PerSecond => "per second",
            Unit::Micros => "µs",
            Unit::Millis => "ms",
            Unit::MiB => "MiB",
            Unit::KiB => "KiB",
            Unit::Count => "count",
            Unit::Cores => "cores",
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Unit::PerSecond => format!("{}/s", thousands(v)),
            Unit::Micros => format!("{v:.0} µs"),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::KiB => format!("{v:.1} KiB"),
            Unit::Count => thousands(v),
            Unit::Cores => format!("{v:.3} cores"),
        }
    }
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Row {
    /// A rate: more is better, so the ratio is the floor's rate over tbot's.
    pub fn rate(section: &'static str, measure: String, value: f64, floor: &str, floor_value: f64) -> Row {
        Row {
            section,
            measure,
            value,
            unit: Unit::PerSecond,
            floor: floor.to_owned(),
            floor_value,
            ratio: floor_value / value,
        }
    }

    /// A duration or a size: less is better, so the ratio is tbot's over the floor's.
    pub fn cost(section: &'static str, measure: String, value: f64, unit: Unit, floor: &str, floor_value: f64) -> Row {
        Row {
            section,
            measure,
            value,
            unit,
            floor: floor.to_owned(),
            floor_value,
            ratio: value / floor_value,
        }
    }

    pub fn duration(
        section: &'static str,
        measure: String,
        value: Duration,
        floor: &str,
        floor_value: Duration,
    ) -> Row {
        let (unit, scale) = if floor_value < Duration::from_millis(10) {
            (Unit::Micros, 1e6)
        } else {
            (Unit::Millis, 1e3)
        };
        Row::cost(
            section,
            measure,
            value.as_secs_f64() * scale,
            unit,
            floor,
            floor_value.as_secs_f64() * scale,
        )
    }
}

/// The `p` quantile (0 to 1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sizes: the real run, or the quick smoke run.
#[derive(Clone, Copy)]
pub struct Scale {
    pub full: bool,
}

impl Scale {
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        if self.full { full } else { smoke }
    }
}

struct Options {
    scale: Scale,
    only: Vec<String>,
    json: Option<String>,
    markdown: Option<String>,
}

fn options() -> Option<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // A test runner asking for tests: one, the smoke run, and none among the ignored ones.
        if !args.iter().any(|a| a == "--ignored") {
            println!("smoke: test");
        }
        return None;
    }
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        })
    };
    let only: Vec<String> = value("--only")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    for name in &only {
        let names: Vec<&str> = SECTION_NOTES.iter().map(|(n, _)| *n).collect();
        assert!(
            names.contains(&name.as_str()),
            "unknown section {name:?}: the sections are {}",
            names.join(", ")
        );
    }
    Some(Options {
        scale: Scale {
            full: args.iter().any(|a| a == "--bench"),
        },
        only,
        json: value("--json"),
        markdown: value("--markdown"),
    })
}

/// A peer a section needs (etcd, haproxy, podman) is not installed: the section is skipped, or with
/// `CI=true` (the smoke run in CI, where `scripts/test.sh` installs them) the run fails.
pub fn peer_missing(message: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("skipping: {message}");
}

/// Polls `f` every 50 ms until it gives a value; panics after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The allocator of the `tbot` binary (see src/bin/tbot.rs), so that what runs in this process (the
/// Workload API, the issuer, minting, and the load generators and floors beside them) runs as it
/// does in the product.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let Some(options) = options() else { return };
    let runs = |name: &str| options.only.is_empty() || options.only.iter().any(|o| o == name);
    let scale = options.scale;
    // As the daemon's runtime: in-process servers (the Workload API of `api`) attest on as many
    // blocking threads as `tbot start` has.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(tbot::cli::tbot::MAX_BLOCKING_THREADS)
        .build()
        .unwrap();
    let mut rows = Vec::new();
    if runs("mint") {
        rows.extend(mint::run(scale));
    }
    if runs("load") {
        rows.extend(load::run(scale));
    }
    if runs("api") {
        rows.extend(runtime.block_on(api::run(scale)));
    }
    if runs("edit") {
        rows.extend(runtime.block_on(daemon::edits(scale)));
    }
    if runs("scale") {
        rows.extend(runtime.block_on(daemon::converge_at_scale(scale)));
    }
    if runs("streams") {
        rows.extend(runtime.block_on(daemon::many_streams(scale)));
    }
    if runs("fleet") {
        rows.extend(runtime.block_on(fleet::run(scale)));
    }
    if runs("ha") {
        rows.extend(runtime.block_on(ha::run(scale)));
    }
    if runs("consumers") {
        rows.extend(runtime.block_on(consumers::run(scale)));
    }
    if runs("containers") {
        rows.extend(runtime.block_on(containers::run(scale)));
    }
    let machine = machine();
    print!("{}", table(&rows));
    println!("\n{machine}");
    if let Some(path) = &options.json {
        std::fs::write(path, json(&rows, &machine, scale)).unwrap();
        println!("wrote {path}");
    }
    if let Some(path) = &options.markdown {
        std::fs::write(path, markdown(&rows, &machine)).unwrap();
        println!("wrote {path}");
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from("| measure | tbot | floor, measured in the same run | floor | ratio |\n");
    out.push_str("|---|---:|---|---:|---:|\n");
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {:.2}x |",
            r.measure,
            r.unit.show(r.value),
            r.floor,
            r.unit.show(r.floor_value),
            r.ratio
        )
        .unwrap();
    }
    out
}

/// The machine, as this run saw it.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease");
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Machine: {model}, {cores} cores available, {memory_gib:.0} GiB; Linux {}; {rustc}.",
        kernel.trim()
    )
}

fn json(rows: &[Row], machine: &str, scale: Scale) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "section": r.section,
                "measure": r.measure,
                "value": r.value,
                "unit": r.unit.name(),
                "floor": r.floor,
                "floor_value": r.floor_value,
                "ratio": r.ratio,
            })
        })
        .collect();
    let report = serde_json::json!({
        "machine": machine,
        "full": scale.full,
        "date": now(),
        "rows": rows,
    });
    serde_json::to_string_pretty(&report).unwrap() + "\n"
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// What each section measures, for the docs page.
const SECTION_NOTES: [(&str, &str); 10] = [
    (
        "mint",
        "the issuer's whole path per SVID (bot certificate check, RBAC, rules, templates, certificate, signature), in process",
    ),
    (
        "load",
        "a generated directory of `workload_identity` files: the full load, and a reload after one file changed, as a file event does it (only the file the watcher names is read) and as a full rescan does it (the others are vouched for by their stamps)",
    ),
    (
        "api",
        "the Workload API on a unix socket with attestation, against bare tonic servers on the same kind of socket (a unary health check, and a `SpiffeWorkloadAPI` that streams one prepared message); the first message during a burst of 1,000 new connections at once; and how many SVIDs 1,000 one-shot fetches by one workload mint",
    ),
    (
        "edit",
        "the real `tbot start`; a `workload_identity` saved the way editors do (temp file, rename), timed to the new SVID on an open stream",
    ),
    (
        "scale",
        "the same with 1,000 and 10,000 identities in the directory: the time should not grow with the number of documents",
    ),
    (
        "streams",
        "1,000 open `FetchX509SVID` streams, each on its own connection: the daemon's memory (in all, and per stream against a bare attested connection), and a CA rotation (`tbotctl rotate ca`, then `--force` to activate it) from activation until every stream has a new SVID",
    ),
    (
        "fleet",
        "the real `tbot start` as an issuer host and agents of it over the issuer API (TLS 1.3 on loopback): remote issuance against in-process minting; a remote agent's first `FetchX509SVID` message against a single-host daemon's; edit on the issuer → new SVID on a remote agent's stream; and a load generator speaking the issuer protocol as 20,000 simulated agents, or as many as the hard open-file limit allows (each its own TLS connection, source address, bot instance and `Watch` stream), holding two SVIDs each: joins per second (beside TLS 1.3 handshakes per second on the same loopback), the issuer's CPU and memory at rest and during renewals, edit → every agent notified (`TBOT_BENCH_AGENTS=N` for another number of agents)",
    ),
    (
        "ha",
        "three replicas (`tbot start`, `storage.type: etcd`) on a real 3-member etcd cluster (Debian's, `--unsafe-no-fsync`, on loopback) against one issuer on a storage directory, under the same clients: token joins per second and remote X509-SVID issuance; and bot renewal latency through haproxy while one replica is SIGKILLed (each renewal retried until signed), against the same with every replica up",
    ),
    (
        "consumers",
        "the consumers that do not speak the Workload API: Envoy SDS's first secret after connecting (our own tonic client of the SDS subset, a cached identity) against `FetchX509SVID`'s first message on the same daemon; and an x509 output's rotation (four atomic file replacements and an `on_update` exec of `true`) against the same files written in place and the same hook",
    ),
    (
        "containers",
        "a caller in a real podman container (this process, moved into the container's cgroups as `podman exec` moves a process) on a daemon whose service has the podman attestor on `podman system service`: the first `FetchX509SVID` message when the engine is asked, and when its answer is cached (2 s), against the same for a host process",
    ),
];

fn markdown(rows: &[Row], machine: &str) -> String {
    let notes: String = SECTION_NOTES
        .iter()
        .map(|(name, note)| format!("- `{name}`: {note}.\n"))
        .collect();
    format!(
        "# Benchmarks\n\n\
         Written by `cargo bench --bench report -- --markdown docs/benchmarks.md --json docs/benchmarks.json`\n\
         on {date}. Every row has a floor measured in the same run on the same machine; the ratio is tbot's\n\
         cost over the floor's (1.00x is the floor itself). `-- --only SECTION,...` runs some sections:\n\n\
         {notes}\n\
         {machine}\n\n\
         {table}",
        date = now(),
        table = table(rows)
    )
}
