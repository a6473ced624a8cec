//! `tbotctl get`, `status` and `apply`: the commands that talk to a running daemon's admin API.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::tbotctl::InputArgs;
use crate::admin::proto::admin_client::AdminClient;
use crate::admin::proto::{ApplyRequest, FileError, GetRequest, ObjectStatus, StatusRequest};
use crate::manifest::render;
use crate::manifest::{self, Input};
use crate::resource::duration::Duration as GoDuration;

/// How to reach the daemon.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// The daemon's admin socket; by default found from the directory's agent config.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RotatedKey {
    /// The X.509 CA.
    Ca,
    /// The JWT-SVID signing key.
    Jwt,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// `ca` or `jwt`.
    #[arg(value_enum)]
    pub key: RotatedKey,
    /// How long the successor is published before it signs (every agent gets it first).
    #[arg(long, default_value = "10m", value_parser = crate::resource::Duration::parse)]
    pub grace: crate::resource::Duration,
    /// While a rotation is in progress: take its next step now (activate the successor, or retire
    /// the old key).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetOutput {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// `KIND` or `KIND/NAME` (for example `workload_identity/example`); all objects when left out.
    pub what: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: GetOutput,
    /// Print token names instead of masking them.
    #[arg(long)]
    pub show_secrets: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

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

fn fail(message: impl std::fmt::Display, hint: &str) -> ExitCode {
    eprintln!("error: {message}\n  = hint: {hint}");
    ExitCode::from(2)
}

impl DaemonArgs {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.admin_socket {
            return Ok(path.clone());
        }
        let loaded = manifest::load(&self.input.inputs()).map_err(|d| render::diagnostic(&d))?;
        crate::admin::socket_for(&loaded.state).ok_or_else(|| {
            "no agent config and no `issuer` document in these documents to find the admin socket from".to_owned()
        })
    }

    async fn connect(&self) -> Result<AdminClient<tonic::transport::Channel>, ExitCode> {
        let socket = self
            .socket()
            .map_err(|e| fail(e, "pass --dir with the daemon's directory, or --admin-socket PATH"))?;
        match crate::workload_api::client::connect(&socket.display().to_string()).await {
            Ok(channel) => Ok(AdminClient::new(channel)),
            Err(e) => Err(fail(
                e,
                "is `tbot start` running with this directory? (`tbotctl diff` works without a daemon)",
            )),
        }
    }
}

fn explain(status: tonic::Status) -> ExitCode {
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            fail(message, "run tbotctl as root or as the daemon's user")
        }
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => fail(
            message,
            "is the daemon still running? its log says more (`journalctl -u tbot` or its terminal)",
        ),
        // The daemon's own message says what to do next.
        _ => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// A serializable view of an object's status (`-o yaml|json`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct View<'a> {
    kind: &'a str,
    name: String,
    path: &'a str,
    generation: u64,
    observed_generation: u64,
    conditions: Vec<ConditionView<'a>>,
    /// A bot's instances, on an issuer host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    instances: Vec<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConditionView<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    reason: &'a str,
    message: &'a str,
    last_transition_time: &'a str,
}

fn shown_name(o: &ObjectStatus, show_secrets: bool) -> String {
    if o.kind == "token" && !show_secrets {
        "<secret>".into()
    } else {
        o.name.clone()
    }
}

fn problems(o: &ObjectStatus) -> String {
    o.conditions
        .iter()
        .filter(|c| (c.status == "True") == matches!(c.r#type.as_str(), "Invalid" | "Stalled" | "RestartRequired"))
        .filter(|c| c.r#type != "Ready" && c.r#type != "Reconciling")
        .map(|c| format!("{}: {}", c.r#type, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn ready(o: &ObjectStatus) -> bool {
    o.observed_generation == o.generation && o.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True")
}

pub async fn get(args: &GetArgs) -> ExitCode {
    let (kind, name) = match args.what.as_deref() {
        None => (String::new(), String::new()),
        Some(what) => match what.split_once('/') {
            Some((k, n)) => (k.to_owned(), n.to_owned()),
            None => (what.to_owned(), String::new()),
        },
    };
    if !kind.is_empty() && !crate::resource::Kind::ALL.iter().any(|k| k.as_str() == kind) {
        return fail(
            format!("unknown kind `{kind}`"),
            "the kinds are agent_config, cluster, issuer, bot, token, role, workload_identity",
        );
    }
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (objects, file_errors) = match client.get(GetRequest { kind, name }).await {
        Ok(r) => {
            let r = r.into_inner();
            (r.objects, r.file_errors)
        }
        Err(status) => return explain(status),
    };
    match args.output {
        GetOutput::Table => {
            let rows: Vec<[String; 5]> = objects
                .iter()
                .map(|o| {
                    [
                        format!("{}/{}", o.kind, shown_name(o, args.show_secrets)),
                        o.generation.to_string(),
                        o.observed_generation.to_string(),
                        if ready(o) { "True" } else { "False" }.to_owned(),
                        problems(o),
                    ]
                })
                .collect();
            print_table("", ["OBJECT", "GENERATION", "OBSERVED", "READY", "MESSAGE"], &rows);
            for o in objects.iter().filter(|o| !o.instances.is_empty()) {
                print_instances(o);
            }
            print_file_errors(&file_errors);
        }
        GetOutput::Yaml | GetOutput::Json => {
            let views: Vec<View> = objects
                .iter()
                .map(|o| View {
                    kind: &o.kind,
                    name: shown_name(o, args.show_secrets),
                    path: &o.path,
                    generation: o.generation,
                    observed_generation: o.observed_generation,
                    conditions: o
                        .conditions
                        .iter()
                        .map(|c| ConditionView {
                            kind: &c.r#type,
                            status: &c.status,
                            reason: &c.reason,
                            message: &c.message,
                            last_transition_time: &c.last_transition_time,
                        })
                        .collect(),
                    instances: o
                        .instances
                        .iter()
                        .map(|i| {
                            serde_json::json!({
                                "id": i.id, "joinMethod": i.join_method, "iamArn": i.iam_arn,
                                "address": i.address, "generation": i.generation, "joinedAt": i.joined_at,
                                "lastRenewal": i.last_renewal, "expires": i.expires, "locked": i.locked,
                            })
                        })
                        .collect(),
                })
                .collect();
            let files: Vec<FileErrorView> = file_errors
                .iter()
                .map(|f| FileErrorView {
                    path: &f.path,
                    location: &f.location,
                    message: &f.message,
                    errors: f.errors,
                })
                .collect();
            // Objects as a list, as before; the failing files beside them only when there are any.
            let out = if files.is_empty() {
                serde_json::to_value(&views)
            } else {
                serde_json::to_value(GetView {
                    objects: views,
                    files_failing_to_load: files,
                })
            }
            .expect("json");
            if args.output == GetOutput::Json {
                println!("{}", serde_json::to_string_pretty(&out).expect("json"));
            } else {
                print!("{}", manifest::yaml::to_string(&out).unwrap_or_default());
            }
        }
    }
    ExitCode::SUCCESS
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GetView<'a> {
    objects: Vec<View<'a>>,
    files_failing_to_load: Vec<FileErrorView<'a>>,
}

#[derive(Serialize)]
struct FileErrorView<'a> {
    path: &'a str,
    location: &'a str,
    message: &'a str,
    errors: u32,
}

/// Prints rows under a header, each column as wide as its widest cell, each line after `indent`.
fn print_table<const N: usize>(indent: &str, header: [&str; N], rows: &[[String; N]]) {
    let header = header.map(String::from);
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in [&header].into_iter().chain(rows.iter()) {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{indent}{}", line.join("  ").trim_end());
    }
}

/// A bot's instances on an issuer host (one per join).
fn print_instances(o: &ObjectStatus) {
    println!();
    println!("Instances of bot/{} ({}):", o.name, o.instances.len());
    let rows: Vec<[String; 8]> = o
        .instances
        .iter()
        .map(|i| {
            [
                i.id.clone(),
                i.join_method.clone(),
                if i.iam_arn.is_empty() {
                    "-".into()
                } else {
                    i.iam_arn.clone()
                },
                if i.address.is_empty() {
                    "-".into()
                } else {
                    i.address.clone()
                },
                i.generation.to_string(),
                if i.last_renewal.is_empty() {
                    "-".into()
                } else {
                    i.last_renewal.clone()
                },
                i.expires.clone(),
                if i.locked.is_empty() {
                    "no".into()
                } else {
                    format!("LOCKED: {}", i.locked)
                },
            ]
        })
        .collect();
    print_table(
        "  ",
        [
            "ID",
            "JOIN",
            "IAM ARN",
            "ADDRESS",
            "GENERATION",
            "LAST RENEWAL",
            "EXPIRES",
            "LOCKED",
        ],
        &rows,
    );
}

/// The files that fail to load, after the objects: each with its first error; new files included,
/// which have no object to show `Invalid` on.
fn print_file_errors(files: &[FileError]) {
    if files.is_empty() {
        return;
    }
    println!();
    println!(
        "Files that fail to load (the last good version of their objects stays in force; a new file is not applied):"
    );
    for f in files {
        let more = match f.errors {
            0 | 1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        println!("  {}: {}{more}", f.location, f.message);
    }
    println!("  run `tbotctl validate` on the directory for every error with its hint");
}

pub async fn status(args: &DaemonArgs) -> ExitCode {
    let mut client = match args.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = match client.status(StatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(status) => return explain(status),
    };
    if s.trust_domain.is_empty() {
        println!(
            "tbot (pid {}), trust domain not known yet (the agent has not reached its issuer)",
            s.pid
        );
    } else {
        println!("tbot (pid {}) for trust domain {}", s.pid, s.trust_domain);
    }
    for pin in &s.ca_pins {
        println!("CA pin: {pin}");
    }
    if let Some(link) = &s.issuer {
        if link.connected {
            println!("issuer: {} (connected)", link.address);
        } else {
            println!("issuer: {} (NOT connected: {})", link.address, link.message);
        }
    }
    if !s.issuer_listen.is_empty() {
        println!("issuer API: {} ({} agents connected)", s.issuer_listen, s.agents.len());
        // A fleet has thousands: the longest-connected first, then a count.
        const SHOWN: usize = 25;
        if !s.agents.is_empty() {
            let rows: Vec<[String; 5]> = s
                .agents
                .iter()
                .take(SHOWN)
                .map(|a| {
                    [
                        format!("{}/{}", a.bot, a.instance),
                        a.address.clone(),
                        a.generation.to_string(),
                        a.connected_at.clone(),
                        a.last_seen.clone(),
                    ]
                })
                .collect();
            print_table(
                "  ",
                ["BOT/INSTANCE", "ADDRESS", "GENERATION", "CONNECTED", "LAST SEEN"],
                &rows,
            );
        }
    }
    if !s.issuer_storage.is_empty() {
        println!("issuer storage: {}", s.issuer_storage);
    }
    print_replicas(&s.replicas, &s.drift);
    print_keys(&s.keys);
    if !s.bundle_endpoint.is_empty() {
        println!("bundle endpoint: {}", s.bundle_endpoint);
    }
    print_federations(&s.federations);
    if s.bot.is_empty() {
        println!("bot: none on this host (no agent config)");
    } else {
        println!("bot: {} (certificate expires {})", s.bot, s.bot_expires);
    }
    for svc in &s.services {
        if svc.destination.is_empty() {
            println!("listener {}: {} (Workload API and SDS)", svc.name, svc.listen);
        } else {
            println!("output {}: {}: {}", svc.name, svc.destination, svc.state);
        }
    }
    println!("objects: {} ({} not ready)", s.objects, s.not_ready);
    print_file_errors(&s.file_errors);
    let conflicts = s.replicas.iter().any(|r| !r.conflict.is_empty());
    if s.not_ready == 0 && s.file_errors.is_empty() && s.drift.is_empty() && !conflicts {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `tbotctl rotate ca|jwt`.
pub async fn rotate(args: &RotateArgs) -> ExitCode {
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = crate::admin::proto::RotateRequest {
        key: match args.key {
            RotatedKey::Ca => "ca".into(),
            RotatedKey::Jwt => "jwt".into(),
        },
        grace_seconds: args.grace.as_std().as_secs().min(u64::from(u32::MAX)) as u32,
        force: args.force,
    };
    match client.rotate(request).await {
        Ok(r) => {
            let r = r.into_inner();
            println!("{}", r.message);
            print_keys(&r.keys);
            ExitCode::SUCCESS
        }
        Err(status) => explain(status),
    }
}

/// Every CA and JWT key with its phase and dates.
fn print_keys(keys: &[crate::admin::proto::KeyState]) {
    if keys.is_empty() {
        return;
    }
    println!("keys:");
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                format!("{} {}", k.key, k.id),
                k.phase.clone(),
                if k.phase_ends.is_empty() {
                    "-".into()
                } else {
                    k.phase_ends.clone()
                },
                if k.created.is_empty() {
                    "-".into()
                } else {
                    k.created.clone()
                },
                k.not_after.clone(),
                k.name.clone(),
            ]
        })
        .collect();
    print_table(
        "  ",
        ["KEY", "PHASE", "PHASE ENDS", "CREATED", "NOT AFTER", "PIN / KID"],
        &rows,
    );
}

/// The foreign trust domains and how fresh their bundles are.
/// How long ago an RFC 3339 time was, or `never` when it is not one.
fn age(at: &str) -> String {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map(|t| format!("{}s ago", (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0)))
        .unwrap_or_else(|_| "never".into())
}

fn print_federations(federations: &[crate::admin::proto::Federation]) {
    for f in federations {
        let synced = if f.synced_at.is_empty() {
            "never fetched".to_owned()
        } else {
            format!("synced {} ({})", f.synced_at, age(&f.synced_at))
        };
        let error = if f.error.is_empty() {
            String::new()
        } else {
            format!("; FAILING: {}", f.error)
        };
        println!(
            "federation {}: {} ({} CAs, {} JWT keys, {synced}, next {}){error}",
            f.trust_domain, f.source, f.x509_authorities, f.jwt_keys, f.next_sync
        );
    }
}

/// The replicas of a shared store, and the documents on which they differ.
fn print_replicas(replicas: &[crate::admin::proto::Replica], drift: &[crate::admin::proto::DocumentDrift]) {
    if replicas.is_empty() {
        return;
    }
    println!("replicas: {}", replicas.len());
    let rows: Vec<[String; 5]> = replicas
        .iter()
        .map(|r| {
            [
                if r.this {
                    format!("{} (this)", r.name)
                } else {
                    r.name.clone()
                },
                r.address.clone(),
                r.started.clone(),
                age(&r.heartbeat),
                if r.ready { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    print_table("  ", ["NAME", "ADDRESS", "STARTED", "LAST HEARTBEAT", "READY"], &rows);
    for r in replicas.iter().filter(|r| !r.conflict.is_empty()) {
        println!(
            "  WARNING: {} is claimed by two processes ({} and another): give each replica its own `metadata.name`",
            r.name, r.conflict
        );
    }
    if drift.is_empty() {
        println!("documents: the same on every replica");
        return;
    }
    println!(
        "documents that differ between replicas ({}): a rollout has not reached every replica",
        drift.len()
    );
    for d in drift {
        let versions: Vec<String> = d
            .versions
            .iter()
            .map(|v| {
                let hash = if v.hash.is_empty() {
                    "missing".to_owned()
                } else {
                    v.hash.chars().take(12).collect()
                };
                format!("{}={hash}", v.replica)
            })
            .collect();
        println!("  {}: {}", d.document, versions.join(" "));
    }
    println!("  = hint: deploy the same documents to every replica (each reloads them live)");
}

/// Writes a file atomically into `dir` (temp file, fsync, rename).
fn write_atomically(dir: &Path, name: &std::ffi::OsStr, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let target = dir.join(name);
    let temp = dir.join(format!(".{}.tbotctl~", name.to_string_lossy()));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(text)?;
    file.sync_all()?;
    std::fs::rename(&temp, &target)?;
    std::fs::File::open(dir)?.sync_all()
}

pub async fn apply(args: &ApplyArgs) -> ExitCode {
    let input = &args.daemon.input;
    let dir = input
        .dirs()
        .first()
        .cloned()
        .unwrap_or_else(|| super::tbotctl::DEFAULT_DIR.into());
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
        if let Err(e) = write_atomically(&dir, name, text) {
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
        println!("{}/{shown} {outcome}", r.kind);
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
