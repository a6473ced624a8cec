//! `tbotctl get svids`: the issuer's issuance log (every X509-SVID, JWT-SVID and bot certificate it
//! signed: serial or `jti`, SPIFFE ID, bot and instance), as a table, YAML or JSON.

use std::process::ExitCode;

use crate::admin::proto::IssuedRequest;
use crate::cli::args::{explain, fail, out, outln};
use crate::issuer::state::issued::Issued;

use super::get::{GetArgs, GetOutput, print_table};

/// `--since` as RFC 3339: a time as given, or a duration back from now.
fn since(text: &str) -> Result<String, String> {
    use time::format_description::well_known::Rfc3339;
    if time::OffsetDateTime::parse(text, &Rfc3339).is_ok() {
        return Ok(text.to_owned());
    }
    let back = crate::resource::duration::Duration::parse(text)
        .map_err(|e| format!("`--since {text}` is neither a duration nor an RFC 3339 time: {e}"))?;
    let at = time::OffsetDateTime::now_utc() - back.as_std();
    Ok(crate::rfc3339(at))
}

pub(super) async fn svids(args: &GetArgs) -> ExitCode {
    let since = match args.since.as_deref().map(since).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return fail(e, "say `--since 12h` or `--since 2026-12-05T03:00:00Z`"),
    };
    let mut client = match args.daemon.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = IssuedRequest {
        bot: args.bot.clone().unwrap_or_default(),
        spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
        since,
    };
    let answer = match client.issued(request).await {
        Ok(r) => crate::admin::issued::collect(r.into_inner()).await,
        Err(status) => Err(status),
    };
    let lines = match answer {
        Ok(lines) => lines,
        Err(status) => return explain(status),
    };
    let records: Vec<Issued> = match lines.iter().map(|l| serde_json::from_str(l)).collect() {
        Ok(records) => records,
        Err(e) => {
            return fail(
                format!("the daemon's issuance log answer does not parse: {e}"),
                "use the same version of tbotctl as the daemon",
            );
        }
    };
    match args.output {
        GetOutput::Table => {
            let rows: Vec<[String; 6]> = records
                .iter()
                .map(|r| {
                    [
                        crate::rfc3339(r.issued_at),
                        r.kind.as_str().to_owned(),
                        r.serial.clone(),
                        if r.spiffe_id.is_empty() {
                            "-".into()
                        } else {
                            r.spiffe_id.clone()
                        },
                        format!("{}/{}", r.bot, r.instance),
                        crate::rfc3339(r.not_after),
                    ]
                })
                .collect();
            print_table(
                "",
                ["ISSUED", "KIND", "SERIAL", "SPIFFE ID", "BOT/INSTANCE", "NOT AFTER"],
                &rows,
            );
            if records.is_empty() {
                outln!("(nothing issued matches)");
            }
        }
        GetOutput::Json => outln!("{}", serde_json::to_string_pretty(&records).expect("json")),
        GetOutput::Yaml => {
            let value = serde_json::to_value(&records).expect("json");
            out!("{}", crate::manifest::yaml::to_string(&value).unwrap_or_default());
        }
    }
    ExitCode::SUCCESS
}
