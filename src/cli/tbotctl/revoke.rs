//! `tbotctl revoke`: writes a `revocation` document for certificates whose keys leaked — named by
//! serial, or found in the issuer's issuance log by SPIFFE ID or bot instance — into the
//! directory, and waits until the running daemon has applied it (the CRL lists them).

use std::process::ExitCode;

use clap::Args;

use crate::admin::proto::{ApplyRequest, IssuedRequest};
use crate::cli::args::{DaemonArgs, explain, fail, outln};
use crate::issuer::state::issued::{Issued, IssuedKind};
use crate::resource::revocation::Serial;

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// A certificate's serial number, as `tbotctl get svids` or `openssl x509 -serial` prints it;
    /// repeatable.
    #[arg(long)]
    pub serial: Vec<String>,
    /// Every still-valid X509-SVID of this SPIFFE ID, from the issuance log.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Every still-valid certificate of this bot instance (`BOT/INSTANCE`, as `tbotctl get bot/BOT`
    /// lists it): its X509-SVIDs and bot certificates, from the issuance log.
    #[arg(long, value_name = "BOT/INSTANCE")]
    pub bot_instance: Option<String>,
    /// Why, for whoever reads the revocation later.
    #[arg(long)]
    pub reason: String,
    /// The document's name (default `revoked-<UTC time>`); it is written to
    /// `<dir>/revocation-<name>.yaml`.
    #[arg(long)]
    pub name: Option<String>,
    /// Print the document, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The still-valid certificates of the issuance log `request` selects and `keep` keeps.
async fn from_log(
    args: &RevokeArgs,
    request: IssuedRequest,
    keep: impl Fn(&Issued) -> bool,
) -> Result<Vec<Issued>, ExitCode> {
    let mut client = args.daemon.connect().await?;
    let stream = client.issued(request).await.map_err(explain)?.into_inner();
    let lines = crate::admin::issued::collect(stream).await.map_err(explain)?;
    let now = time::OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for line in lines {
        let record: Issued = serde_json::from_str(&line).map_err(|e| {
            fail(
                format!("the issuance log answer does not parse: {e}"),
                "use the daemon's version of tbotctl",
            )
        })?;
        if record.not_after > now && keep(&record) {
            out.push(record);
        }
    }
    Ok(out)
}

pub async fn revoke(args: &RevokeArgs) -> ExitCode {
    if args.reason.trim().is_empty() {
        return fail("`--reason` is empty", "say why, for whoever reads the revocation later");
    }
    let mut serials: Vec<(Serial, String)> = Vec::new();
    for s in &args.serial {
        match Serial::parse(s) {
            Ok(serial) => serials.push((serial, "named by serial".into())),
            Err(e) => return fail(e, "write the serial as `tbotctl get svids` prints it"),
        }
    }
    let mut jwts = 0;
    let mut found: Vec<Issued> = Vec::new();
    if let Some(id) = &args.spiffe_id {
        let request = IssuedRequest {
            spiffe_id: id.clone(),
            ..Default::default()
        };
        match from_log(args, request, |_| true).await {
            Ok(records) => found.extend(records),
            Err(code) => return code,
        }
    }
    let locking = match args.bot_instance.as_deref().map(super::lock::bot_instance).transpose() {
        Ok(locking) => locking,
        Err(code) => return code,
    };
    // A bot instance is locked before anything else: nothing more is issued to its key while the
    // revocation is written and applied.
    if let Some((bot, instance)) = &locking
        && !args.dry_run
    {
        let locked = super::lock::send(&args.daemon, bot.clone(), instance.clone(), args.reason.clone(), false).await;
        if locked != ExitCode::SUCCESS {
            return locked;
        }
    }
    if locking.is_none() && args.spiffe_id.is_none() {
        // Revocations belong on the issuer host: asking for its log (nothing, from the far future)
        // is refused by an agent of a remote issuer, before anything is written.
        let probe = IssuedRequest {
            since: "9999-01-01T00:00:00Z".into(),
            ..Default::default()
        };
        if let Err(code) = from_log(args, probe, |_| false).await {
            return code;
        }
    }
    if let Some((bot, instance)) = &locking {
        let request = IssuedRequest {
            bot: bot.clone(),
            ..Default::default()
        };
        match from_log(args, request, |r| &r.instance == instance).await {
            Ok(records) => found.extend(records),
            Err(code) => return code,
        }
    }
    // When every serial came from the log, the document ends when the last of them expires.
    let expires = found
        .iter()
        .filter(|r| r.kind != IssuedKind::JwtSvid)
        .map(|r| r.not_after)
        .max()
        .filter(|_| args.serial.is_empty());
    for r in found {
        if r.kind == IssuedKind::JwtSvid {
            jwts += 1;
            continue;
        }
        let what = match r.kind {
            IssuedKind::BotCertificate => format!("bot certificate of {}/{}", r.bot, r.instance),
            _ => format!("{} of {}/{}", r.spiffe_id, r.bot, r.instance),
        };
        let note = format!("{what}, expires {}", crate::rfc3339(r.not_after));
        match Serial::parse(&r.serial) {
            Ok(serial) if !serials.iter().any(|(s, _)| *s == serial) => serials.push((serial, note)),
            _ => {}
        }
    }
    if serials.is_empty() {
        return fail(
            "nothing to revoke: no serial given, and the issuance log has no still-valid certificate of that SPIFFE ID or bot instance",
            "check `tbotctl get svids` on the issuer host, or pass --serial",
        );
    }
    let name = args.name.clone().unwrap_or_else(|| {
        let now = time::OffsetDateTime::now_utc();
        format!(
            "revoked-{:04}{:02}{:02}t{:02}{:02}{:02}z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        )
    });
    if let Err(e) = crate::resource::Name::parse(&name) {
        return fail(e, "pick a name without spaces or `/`");
    }
    let mut text = format!(
        "# Written by `tbotctl revoke`. The issuer's CRL lists these certificates until they expire.\n\
         kind: revocation\nversion: v1\nmetadata:\n  name: {}\n{}spec:\n  reason: {}\n  serials:\n",
        // Quoted: a name may start with a character YAML reads as syntax (`#`, `[`, `&`, `!`, …).
        serde_json::to_string(&name).expect("a string serializes"),
        expires.map_or_else(String::new, |e| format!(
            "  # When the last of these certificates expires: the revocation ends by itself.\n  expires: {}\n",
            crate::rfc3339(e)
        )),
        serde_json::to_string(args.reason.trim()).expect("a string serializes")
    );
    for (serial, note) in &serials {
        text.push_str(&format!("    - \"{serial}\"   # {note}\n"));
    }
    if args.dry_run {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let dir = args
        .daemon
        .input
        .dirs()
        .first()
        .cloned()
        .unwrap_or_else(|| crate::cli::args::DEFAULT_DIR.into());
    // A name may be 253 bytes; a file name at most 255: a long one is cut and made unique.
    let file = if name.len() > 200 {
        let cut: String = name.chars().take(100).collect();
        format!("revocation-{cut}-{}.yaml", &crate::sha256_hex(name.as_bytes())[..12])
    } else {
        format!("revocation-{name}.yaml")
    };
    let path = dir.join(file);
    if path.exists() {
        return fail(
            format!("{} already exists", path.display()),
            "pass another --name, or edit that file",
        );
    }
    if let Err(e) = super::apply::write_document(&path, text.as_bytes()) {
        return fail(
            format!("cannot write {}: {e}", path.display()),
            "run tbotctl as the directory's owner",
        );
    }
    outln!(
        "wrote {} ({} serial{})",
        path.display(),
        serials.len(),
        if serials.len() == 1 { "" } else { "s" }
    );
    if jwts > 0 {
        outln!(
            "{jwts} JWT-SVID(s) matched too: no CRL covers a JWT-SVID; they expire by themselves (or rotate the JWT key)"
        );
    }
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.apply(ApplyRequest { wait_seconds: 30 }).await {
        Ok(r) if r.get_ref().converged => {
            outln!(
                "revocation/{name} applied: this issuer's CRLs list it, and the other replicas' once it reaches the \
                 store (their logs warn while it cannot; deploy the document to them too, so that removing it later \
                 lifts it everywhere)"
            );
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!(
                "revocation/{name} is written, but the daemon has not converged within 30 s, so its CRL may not list it yet: \
                 `tbotctl get` shows what is not ready"
            );
            ExitCode::from(1)
        }
        Err(status) => explain(status),
    }
}
