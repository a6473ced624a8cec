//! Loading a generated directory of workload identities: documents per second for the full load
//! (read, YAML, schema, typed decode, template and cross-document checks), against a floor measured
//! in the same run: reading the same files and parsing their YAML, nothing else. Then a reload after
//! one file changed: as a file event does it (only the named file read), and as a full rescan does
//! it (every file listed and its stamp examined), both against listing the directory and `stat`ing
//! every file.

use std::path::Path;
use std::time::{Duration, Instant};

use tbot::manifest::{self, Input, files, yaml};

use crate::{Row, Scale, common};

const ROUNDS: usize = 5;

/// Rounds of a reload after one change (each a few ms, and noisier on a shared machine).
const RELOAD_ROUNDS: usize = 20;

/// The best of several rounds.
fn best(round: impl FnMut()) -> Duration {
    best_of(ROUNDS, round)
}

/// The best of `rounds` rounds.
fn best_of(rounds: usize, mut round: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            round();
            start.elapsed()
        })
        .min()
        .unwrap()
}

/// Edits identity 1 (its SPIFFE ID gains `-edit-k`), reloads with `reload` (given the file), and
/// checks that the edit is in.
fn edit_then(dir: &Path, k: usize, reload: impl FnOnce(std::path::PathBuf) -> manifest::Loaded) {
    let file = common::identity_file(dir, 1);
    std::fs::write(&file, common::identity_text(1, 100_001, &format!("-edit-{k}"))).unwrap();
    let loaded = reload(file);
    // The edited identity, looked up by name (a scan of all 10,000 would be timed with the reload).
    let edited = tbot::resource::ObjectRef::new(tbot::resource::Kind::WorkloadIdentity, "service-1");
    assert!(loaded.state.objects[&edited].source.contains(&format!("-edit-{k}/")));
}

fn floor(dir: &Path) {
    let inputs = [Input::Dir(dir.to_owned())];
    for path in files::discover(&inputs).unwrap() {
        let text = files::read(&path).unwrap();
        std::hint::black_box(yaml::parse(&text).unwrap());
    }
}

pub fn run(scale: Scale) -> Vec<Row> {
    let sizes: Vec<usize> = scale.pick(vec![1_000, 10_000], vec![100]);
    // The YAML decoder needs a big stack (see yaml::PARSE_STACK_BYTES); so does the floor.
    std::thread::Builder::new()
        .stack_size(yaml::PARSE_STACK_BYTES)
        .spawn(move || sizes.into_iter().flat_map(load).collect())
        .unwrap()
        .join()
        .unwrap()
}

fn load(identities: usize) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("unused");
    common::write_directory(dir.path(), identities, &unused, &unused, 0);
    let inputs = [Input::Dir(dir.path().to_owned())];
    let documents = identities + 5;
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
    let full_row = Row::rate(
        "load",
        format!(
            "full directory load, {} documents ({:.0} ms; best of {ROUNDS})",
            crate::thousands(documents as f64),
            full.as_secs_f64() * 1e3
        ),
        documents as f64 / full.as_secs_f64(),
        "reading the files + parsing their YAML",
        documents as f64 / base.as_secs_f64(),
    );

    // A reload after one edit: the cache vouches for every other file by its stamp.
    let mut cache = manifest::LoadCache::default();
    manifest::load_with(&inputs, &mut cache).unwrap();
    // Old enough that the cache trusts the stamps (files changed in the last 2 s are re-read).
    std::thread::sleep(Duration::from_millis(2100));
    manifest::load_with(&inputs, &mut cache).unwrap();
    let mut k = 0;
    let reload = best_of(RELOAD_ROUNDS, || {
        k += 1;
        edit_then(dir.path(), k, |_| manifest::load_with(&inputs, &mut cache).unwrap());
    });
    // What the daemon does on a file event: the watcher names the file, and only it is read.
    let changed = best_of(RELOAD_ROUNDS, || {
        k += 1;
        edit_then(dir.path(), k, |file| {
            manifest::load_changed(&inputs, &mut cache, &manifest::Changes::Paths([file].into())).unwrap()
        });
    });
    let stat = best(|| {
        for path in files::discover(&inputs).unwrap() {
            std::hint::black_box(std::fs::metadata(&path).unwrap());
        }
    });
    let n = crate::thousands(documents as f64);
    let reload_row = Row::duration(
        "load",
        format!("reload after one file changed, {n} documents, the watcher naming it (a file event)"),
        changed,
        "listing the directory + one `stat` per file",
        stat,
    );
    let rescan_row = Row::duration(
        "load",
        format!("reload after one file changed, {n} documents, every file examined (SIGHUP, apply, resync)"),
        reload,
        "listing the directory + one `stat` per file",
        stat,
    );
    vec![full_row, reload_row, rescan_row]
}
