//! `tbotctl get`: the running daemon's objects with their generation and conditions (a table, YAML
//! or JSON), bot instances and the files that fail to load; `tbotctl get svids`, the issuer's
//! issuance log.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::admin::proto::{FileError, GetRequest, ObjectStatus};
use crate::cli::args::{DaemonArgs, explain, fail};
use crate::cli::args::{out, outln};
use crate::manifest::{self};

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
    /// With `svids`: only what this bot got.
    #[arg(long)]
    pub bot: Option<String>,
    /// With `svids`: only SVIDs of this SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// With `svids`: only what was issued since then: a time back from now (`12h`, `30m`) or an
    /// RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// A serializable view of an object's status (`-o yaml|json`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct View<'a> {
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
pub(super) struct ConditionView<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    reason: &'a str,
    message: &'a str,
    last_transition_time: &'a str,
}

pub(super) fn shown_name(o: &ObjectStatus, show_secrets: bool) -> String {
    if o.kind == "token" && !show_secrets {
        "<secret>".into()
    } else {
        o.name.clone()
    }
}

pub(super) fn problems(o: &ObjectStatus) -> String {
    o.conditions
        .iter()
        .filter(|c| (c.status == "True") == matches!(c.r#type.as_str(), "Invalid" | "Stalled" | "RestartRequired"))
        .filter(|c| c.r#type != "Ready" && c.r#type != "Reconciling")
        .map(|c| format!("{}: {}", c.r#type, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn ready(o: &ObjectStatus) -> bool {
    o.observed_generation == o.generation && o.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True")
}

pub async fn get(args: &GetArgs) -> ExitCode {
    if args.what.as_deref() == Some("svids") {
        return super::issued::svids(args).await;
    }
    if args.bot.is_some() || args.spiffe_id.is_some() || args.since.is_some() {
        return fail(
            "`--bot`, `--spiffe-id` and `--since` choose records of the issuance log",
            "run `tbotctl get svids` with them",
        );
    }
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
            "the kinds are agent_config, cluster, issuer, bot, token, role, workload_identity; `svids` lists what the issuer issued",
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
                outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
            } else {
                out!("{}", manifest::yaml::to_string(&out).unwrap_or_default());
            }
        }
    }
    ExitCode::SUCCESS
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GetView<'a> {
    objects: Vec<View<'a>>,
    files_failing_to_load: Vec<FileErrorView<'a>>,
}

#[derive(Serialize)]
pub(super) struct FileErrorView<'a> {
    path: &'a str,
    location: &'a str,
    message: &'a str,
    errors: u32,
}

/// Prints rows under a header, each column as wide as its widest cell, each line after `indent`.
pub(super) fn print_table<const N: usize>(indent: &str, header: [&str; N], rows: &[[String; N]]) {
    let header = header.map(String::from);
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in [&header].into_iter().chain(rows.iter()) {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{indent}{}", line.join("  ").trim_end());
    }
}

/// A bot's instances on an issuer host (one per join).
pub(super) fn print_instances(o: &ObjectStatus) {
    outln!();
    outln!("Instances of bot/{} ({}):", o.name, o.instances.len());
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
pub(super) fn print_file_errors(files: &[FileError]) {
    if files.is_empty() {
        return;
    }
    outln!();
    outln!(
        "Files that fail to load (the last good version of their objects stays in force; a new file is not applied):"
    );
    for f in files {
        let more = match f.errors {
            0 | 1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        outln!("  {}: {}{more}", f.location, f.message);
    }
    outln!("  run `tbotctl validate` on the directory for every error with its hint");
}
