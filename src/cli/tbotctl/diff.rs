//! `tbotctl diff`: what applying the documents would do — a unified diff of what the user wrote for
//! each object, the runtime actions, and the `Plan:` line. Read-only. Exit 0 no changes, 1 changes,
//! 2 error (invalid input included). Token secrets are masked unless `--show-secrets`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Args;

use crate::cli::args::InputArgs;
use crate::controller::{Change, inventory, plan};
use crate::manifest::render;
use crate::manifest::{self, DesiredState};
use crate::resource::Document;
use crate::resource::agent::{JoinMethod, StorageType};
use crate::resource::issuer::IssuerStorageType;

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Print token secrets (the names of `token`-method tokens) instead of masking them.
    #[arg(long)]
    pub show_secrets: bool,
}

const MASK: &str = "<secret>";

/// The names of `token`-method tokens, and `onboarding.token` when it joins by token.
fn secrets(states: &[&DesiredState]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for state in states {
        for object in state.objects.values() {
            match &object.document {
                Document::Token(t) if t.spec.join_method == JoinMethod::Token => {
                    out.insert(t.metadata.name.to_string());
                }
                Document::AgentConfig(a) if a.onboarding.join_method == JoinMethod::Token => {
                    out.insert(a.onboarding.token.clone());
                }
                _ => {}
            }
        }
    }
    out
}

struct Printer {
    secrets: BTreeSet<String>,
    color: bool,
    out: String,
}

impl Printer {
    fn line(&mut self, text: &str) {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), MASK);
        }
        if self.color {
            let code = match text.trim_start().chars().next() {
                Some('+') => Some("32"),
                Some('-') => Some("31"),
                Some('~') => Some("33"),
                Some('@') => Some("36"),
                _ => None,
            };
            if let Some(code) = code {
                text = format!("\x1b[{code}m{text}\x1b[0m");
            }
        }
        self.out.push_str(&text);
        self.out.push('\n');
    }
}

pub fn run(args: &DiffArgs) -> ExitCode {
    let loaded = match manifest::load(&args.input.inputs()) {
        Ok(loaded) => loaded,
        Err(diagnostic) => {
            eprint!("{}", render::diagnostic(&diagnostic));
            return ExitCode::from(2);
        }
    };
    if loaded.has_errors() {
        for d in &loaded.diagnostics {
            eprint!("{}", render::diagnostic(d));
        }
        eprintln!("{}", render::summary(&loaded));
        eprintln!("= hint: diff compares valid documents only; `tbotctl validate` shows the same report");
        return ExitCode::from(2);
    }
    let desired = &loaded.state;
    let agent = desired.objects.values().find_map(|o| match &o.document {
        Document::AgentConfig(a) => Some(a),
        _ => None,
    });
    let from_daemon = crate::admin::socket_for(desired).and_then(|socket| from_daemon(&socket));
    let issuer_storage = desired.objects.values().find_map(|o| match &o.document {
        Document::Issuer(i) => Some(match i.spec.storage.kind {
            IssuerStorageType::Directory => (StorageType::Directory, i.spec.storage.path.clone()),
            // The controller's records of an etcd replica live in its memory (the daemon answers).
            IssuerStorageType::Memory | IssuerStorageType::Etcd => (StorageType::Memory, None),
        }),
        _ => None,
    });
    let storage = issuer_storage.or_else(|| agent.map(|a| (a.storage.kind, a.storage.path.clone())));
    let (applied, against) = match storage {
        _ if from_daemon.is_some() => from_daemon.expect("checked"),
        Some((StorageType::Directory, path)) => {
            let path = path.unwrap_or_else(|| crate::resource::agent::Storage::DEFAULT_PATH.into());
            match inventory::read(&path) {
                Ok(Some(state)) => (
                    Some(state),
                    format!(
                        "No daemon answers on its admin socket; compared with the last applied state in {}.",
                        path.display()
                    ),
                ),
                Ok(None) => (
                    None,
                    format!("Nothing has been applied from {} yet: every object is new.", path.display()),
                ),
                Err(e) => {
                    eprintln!("error: {e}\n  = hint: restore the storage directory, or move it aside to start afresh");
                    return ExitCode::from(2);
                }
            }
        }
        Some((StorageType::Memory, _)) => (
            None,
            "No daemon answers, and this one keeps what it applied in memory (`memory` storage, or an etcd replica): every object is shown as new."
                .to_owned(),
        ),
        None => (None, "There is no agent config among these documents: every object is new.".to_owned()),
    };
    let plan = plan(desired, applied.as_ref());
    let empty = DesiredState::default();
    let before = applied.as_ref().unwrap_or(&empty);
    let mut p = Printer {
        secrets: if args.show_secrets {
            BTreeSet::new()
        } else {
            secrets(&[desired, before])
        },
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        out: String::new(),
    };
    p.line("Symbols: + create, ~ update, - delete");
    p.line(&against);
    for (r, change) in &plan.changes {
        let (old, new) = (before.objects.get(r), desired.objects.get(r));
        let shown =
            |o: Option<&std::sync::Arc<crate::manifest::Object>>| o.map(|o| o.location.path.display().to_string());
        let path = shown(new).or(shown(old)).unwrap_or_default();
        p.line("");
        p.line(&format!("{} {r} ({path})", change.symbol()));
        let old_text = old.map(|o| o.source.as_str()).unwrap_or("");
        let new_text = new.map(|o| o.source.as_str()).unwrap_or("");
        let (old_name, new_name) = match change {
            Change::Create => ("/dev/null".to_owned(), path.clone()),
            Change::Delete => (path.clone(), "/dev/null".to_owned()),
            Change::Update => (format!("applied {}", shown(old).unwrap_or_default()), path.clone()),
        };
        let diff = similar::TextDiff::from_lines(old_text, new_text);
        let unified = diff
            .unified_diff()
            .context_radius(3)
            .header(&old_name, &new_name)
            .to_string();
        for line in unified.lines() {
            p.line(&format!("    {line}"));
        }
    }
    if !plan.steps.is_empty() {
        p.line("");
        p.line("Runtime actions:");
        for step in &plan.steps {
            p.line(&format!("  {}", step.action));
        }
    }
    let (add, change, destroy) = plan.counts();
    p.line("");
    if plan.is_empty() {
        p.line("No changes: the daemon is running what these documents ask for.");
    }
    p.line(&format!(
        "Plan: {add} to add, {change} to change, {destroy} to destroy."
    ));
    crate::cli::args::write_stdout(format_args!("{}", p.out));
    ExitCode::from(u8::from(!plan.is_empty()))
}

/// The running daemon's applied objects, when its admin socket answers.
fn from_daemon(socket: &std::path::Path) -> Option<(Option<DesiredState>, String)> {
    use crate::admin::proto::{GetRequest, StatusRequest, admin_client::AdminClient};
    if !socket.exists() {
        return None;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let ask = async {
            let channel = crate::workload_api::client::connect(&socket.display().to_string())
                .await
                .ok()?;
            let mut client = AdminClient::new(channel);
            let objects = client.get(GetRequest::default()).await.ok()?.into_inner().objects;
            let pid = client.status(StatusRequest {}).await.ok()?.into_inner().pid;
            Some((objects, pid))
        };
        let (objects, pid) = tokio::time::timeout(std::time::Duration::from_secs(5), ask)
            .await
            .ok()??;
        let mut state = DesiredState::default();
        for o in objects {
            let kind = crate::resource::Kind::ALL.into_iter().find(|k| k.as_str() == o.kind)?;
            let document = inventory::decode(kind, serde_json::from_str(&o.document_json).ok()?).ok()?;
            state.objects.insert(
                crate::resource::ObjectRef::new(kind, o.name),
                std::sync::Arc::new(manifest::Object::new(
                    document,
                    manifest::Location {
                        path: o.path.into(),
                        pos: None,
                    },
                    o.hash,
                    o.source,
                )),
            );
        }
        Some((Some(state), format!("Compared with the running daemon (pid {pid}).")))
    })
}
