//! `tbotctl apply`: validates the directory as it will be with the files written, writes them, and
//! waits until the running daemon has converged.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::get::{problems, ready, shown_name};
use crate::admin::proto::{ApplyRequest, GetRequest, ObjectStatus};
use crate::cli::args::outln;
use crate::cli::args::{DaemonArgs, InputArgs, explain, fail};
use crate::manifest::render;
use crate::manifest::{self, Input};
use crate::resource::duration::Duration as GoDuration;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// How long to wait for every object to be Ready at its new generation.
    #[arg(long, default_value = "30s", value_parser = GoDuration::parse)]
    pub wait: GoDuration,
    /// Show what would change (as `tbotctl diff`), write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Writes a document with [`crate::store::replace_file`] (never a torn file for the watcher to
/// read), keeping the mode of the file it replaces; a new file gets `0666` less the umask, as any
/// editor would make it (a `token` document names a secret: a umask of 077 keeps it `0600`).
pub(super) fn write_document(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_or_else(|_| 0o666 & !umask(), |m| m.permissions().mode() & 0o7777);
    crate::store::replace_file(path, text, mode, crate::store::Owner::default()).map_err(|(_, e)| e)
}

pub async fn apply(args: &ApplyArgs) -> ExitCode {
    let input = &args.daemon.input;
    let dir = input
        .dirs()
        .first()
        .cloned()
        .unwrap_or_else(|| crate::cli::args::DEFAULT_DIR.into());
    // The directory as it will be once the files are written, validated before anything is.
    let staged = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return fail(format!("cannot make a staging directory: {e}"), "check TMPDIR"),
    };
    let mut written = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if manifest::files::is_document_name(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::copy(entry.path(), staged.path().join(entry.file_name()));
            }
        }
    }
    // Where each object lives in the directory now: a file that redefines objects of one existing
    // file replaces that file, as `kubectl apply` would update them in place.
    let current = manifest::load(&[Input::Dir(dir.clone())])
        .map(|l| l.state)
        .unwrap_or_default();
    for file in input.files() {
        let Some(own_name) = file.file_name() else {
            return fail(format!("{} is not a file", file.display()), "pass a YAML file with -f");
        };
        let text = match std::fs::read(file) {
            Ok(text) => text,
            Err(e) => return fail(format!("cannot read {}: {e}", file.display()), "check the path"),
        };
        let homes: BTreeSet<PathBuf> = manifest::load(&[Input::File(file.clone())])
            .map(|l| l.state)
            .unwrap_or_default()
            .objects
            .keys()
            .filter_map(|r| current.objects.get(r).map(|o| o.location.path.clone()))
            .collect();
        let name = match homes.iter().next() {
            Some(home) if homes.len() == 1 => home.file_name().unwrap_or(own_name).to_owned(),
            _ => own_name.to_owned(),
        };
        let _ = std::fs::write(staged.path().join(&name), &text);
        written.push((name, text));
    }
    let loaded = match manifest::load(&[Input::Dir(staged.path().to_owned())]) {
        Ok(l) => l,
        Err(d) => {
            eprint!("{}", render::diagnostic(&d));
            return ExitCode::from(2);
        }
    };
    if loaded.has_errors() {
        let staged_path = staged.path().display().to_string();
        for d in &loaded.diagnostics {
            eprint!(
                "{}",
                render::diagnostic(d).replace(&staged_path, &dir.display().to_string())
            );
        }
        eprintln!("{}", render::summary(&loaded));
        return ExitCode::from(2);
    }
    if args.dry_run {
        return super::diff::run(&super::diff::DiffArgs {
            input: InputArgs::dir(staged.path().to_owned()),
            show_secrets: false,
        });
    }
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let before = match client.get(GetRequest::default()).await {
        Ok(r) => r.into_inner().objects,
        Err(status) => return explain(status),
    };
    for (name, text) in &written {
        if let Err(e) = write_document(&dir.join(name), text) {
            return fail(
                format!("cannot write {}: {e}", dir.join(name).display()),
                "check the directory's permissions",
            );
        }
    }
    let applied_files: BTreeSet<PathBuf> = written.iter().map(|(n, _)| staged.path().join(n)).collect();
    let response = match client
        .apply(ApplyRequest {
            wait_seconds: args.wait.as_std().as_secs().max(1) as u32,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return explain(status),
    };
    for (r, object) in &loaded.state.objects {
        if !applied_files.contains(&object.location.path) {
            continue;
        }
        let old = before.iter().find(|o| o.kind == r.kind.as_str() && o.name == r.name);
        let outcome = match old {
            None => "created",
            Some(o) if o.hash != object.hash => "configured",
            Some(_) => "unchanged",
        };
        let shown = if r.kind == crate::resource::Kind::Token {
            "<secret>"
        } else {
            &r.name
        };
        outln!("{}/{shown} {outcome}", r.kind);
    }
    let failures: Vec<&ObjectStatus> = response.objects.iter().filter(|o| !ready(o)).collect();
    for o in &failures {
        eprintln!("{}/{} not ready: {}", o.kind, shown_name(o, false), problems(o));
    }
    if response.converged && failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        if failures.is_empty() {
            eprintln!("the daemon did not converge within {}", args.wait);
        }
        ExitCode::from(1)
    }
}

/// The process's umask (read by setting it and setting it back; `tbotctl` has one thread here).
fn umask() -> u32 {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o077));
    rustix::process::umask(old);
    old.as_raw_mode()
}
