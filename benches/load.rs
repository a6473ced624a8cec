//! Loading a generated directory of workload identities: documents per second for the full load
//! (read, YAML, schema, typed decode, template and cross-document checks), against a floor measured
//! in the same run: reading the same files and parsing their YAML, nothing else.
//!
//! Run with `cargo bench --bench load` (release build). Prints one table.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use tbot::manifest::{self, Input, files, yaml};

const ROUNDS: usize = 5;

fn write_directory(dir: &Path, identities: usize) {
    fs::write(
        dir.join("00-agent.yaml"),
        "version: v2\nproxy_server: bench.example.org:443\nonboarding:\n  join_method: token\n  token: bench-token\n\
         services:\n  - type: workload-identity-api\n    listen: unix:///tmp/bench.sock\n    selector:\n      labels:\n        app: bench\n",
    )
    .unwrap();
    let cluster_side = [
        "kind: token\nversion: v2\nmetadata:\n  name: bench-token\n",
        "spec:\n  roles: [Bot]\n  bot_name: bench\n  join_method: token\n---\n",
        "kind: bot\nversion: v1\nmetadata:\n  name: bench\nspec:\n  roles: [bench]\n---\n",
        "kind: role\nversion: v7\nmetadata:\n  name: bench\nspec:\n  allow:\n",
        "    workload_identity_labels:\n      app: [bench]\n",
        "    rules:\n      - resources: [workload_identity]\n        verbs: [read, list]\n",
    ];
    fs::write(dir.join("01-cluster.yaml"), cluster_side.concat()).unwrap();
    for i in 0..identities {
        fs::write(
            dir.join(format!("wi-{i:05}.yaml")),
            format!(
                "kind: workload_identity\nversion: v1\nmetadata:\n  name: service-{i}\n  labels:\n    app: bench\nspec:\n  rules:\n    allow:\n\
                 \x20     - conditions:\n          - attribute: workload.unix.uid\n            eq:\n              value: \"{uid}\"\n\
                 \x20 spiffe:\n    id: \"/svc/{{{{workload.systemd.service}}}}/{i}\"\n    hint: service-{i}\n    x509:\n      dns_sans: [\"service-{i}.local\"]\n      maximum_ttl: 1h\n",
                uid = 1000 + i % 50
            ),
        )
        .unwrap();
    }
}

/// The best of several rounds.
fn best(mut round: impl FnMut()) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            round();
            start.elapsed()
        })
        .min()
        .unwrap()
}

fn floor(dir: &Path) {
    let inputs = [Input::Dir(dir.to_owned())];
    for path in files::discover(&inputs).unwrap() {
        let text = files::read(&path).unwrap();
        std::hint::black_box(yaml::parse(&text).unwrap());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // A test runner asking for tests: this target has none of its own.
        return;
    }
    // `cargo bench` passes `--bench`; under `cargo test` the table is a quick smoke run.
    let sizes: &'static [usize] = if args.iter().any(|a| a == "--bench") {
        &[1_000, 10_000]
    } else {
        &[100]
    };
    // The YAML decoder needs a big stack (see yaml::PARSE_STACK_BYTES); so does the floor.
    std::thread::Builder::new()
        .stack_size(yaml::PARSE_STACK_BYTES)
        .spawn(move || run(sizes))
        .unwrap()
        .join()
        .unwrap();
}

fn run(sizes: &[usize]) {
    println!("| documents | full load | docs/s | floor: read + YAML | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    for &identities in sizes {
        let dir = tempfile::tempdir().unwrap();
        write_directory(dir.path(), identities);
        let inputs = [Input::Dir(dir.path().to_owned())];
        let documents = identities + 4;
        let mut loaded = None;
        let full = best(|| loaded = Some(manifest::load(&inputs).unwrap()));
        let loaded = loaded.unwrap();
        assert!(
            !loaded.has_errors(),
            "the generated directory is valid: {:?}",
            loaded.diagnostics.first()
        );
        assert_eq!(loaded.state.objects.len(), documents);
        let base = best(|| floor(dir.path()));
        println!(
            "| {documents} | {:.1} ms | {:.0} | {:.1} ms | {:.2}x |",
            full.as_secs_f64() * 1e3,
            documents as f64 / full.as_secs_f64(),
            base.as_secs_f64() * 1e3,
            full.as_secs_f64() / base.as_secs_f64()
        );
    }
}
