//! `tbot spiffe-inspect`: fetch and print what the Workload API gives this process — X509-SVIDs,
//! trust bundles, and with `--audience` JWT-SVIDs and JWT bundles.

use std::process::ExitCode;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_stream::StreamExt;
use x509_parser::extensions::GeneralName;

use crate::workload_api::client;
use crate::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::workload_api::proto::{JwtBundlesRequest, JwtsvidRequest, X509BundlesRequest, X509svidRequest};

fn explain(what: &str, status: &tonic::Status) -> String {
    let why = match status.code() {
        tonic::Code::PermissionDenied => {
            "the agent gives this process no identity (check the workload_identity's rules and the service's selector)"
        }
        tonic::Code::InvalidArgument => "the request was malformed",
        tonic::Code::Unavailable => "the agent is not serving (is `tbot start` running on this socket?)",
        tonic::Code::Unimplemented => "the agent does not serve this call",
        _ => "see the message",
    };
    format!("{what}: {:?}: {} — {why}", status.code(), status.message())
}

fn expiry(der: &[u8]) -> (String, Vec<String>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return ("(unreadable certificate)".into(), vec![]);
    };
    let not_after = cert.validity().not_after.to_datetime();
    let left = not_after - OffsetDateTime::now_utc();
    let dns = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (
        format!(
            "{} (in {}m{}s)",
            not_after.format(&Rfc3339).unwrap_or_default(),
            left.whole_minutes(),
            left.whole_seconds() % 60
        ),
        dns,
    )
}

/// Count the DER certificates concatenated in a bundle.
fn count_certificates(mut der: &[u8]) -> usize {
    let mut n = 0;
    while let Ok((rest, _)) = x509_parser::parse_x509_certificate(der) {
        n += 1;
        der = rest;
    }
    n
}

pub async fn run(path: String, audiences: Vec<String>) -> ExitCode {
    let channel = match client::connect(&path).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "error: {e}\n  = hint: start the agent (`tbot start`) or pass --path unix:///path/to/workload.sock"
            );
            return ExitCode::from(1);
        }
    };
    let mut api = SpiffeWorkloadApiClient::new(channel);
    let mut failed = false;
    // Collected and written at the end, so a closed stdout (`| head`) is not a panic.
    let mut out = String::new();
    macro_rules! say {
        ($($arg:tt)*) => {{
            use std::fmt::Write as _;
            let _ = writeln!(out, $($arg)*);
        }};
    }
    say!("Fetching X509-SVIDs from {path}");
    match api.fetch_x509svid(client::request(X509svidRequest {})).await {
        Ok(stream) => match stream.into_inner().next().await {
            Some(Ok(message)) if message.svids.is_empty() => say!("  No X509-SVIDs were returned."),
            Some(Ok(message)) => {
                for svid in &message.svids {
                    let (expires, dns) = expiry(&svid.x509_svid);
                    say!("- {}", svid.spiffe_id);
                    say!("  Hint: {}", if svid.hint.is_empty() { "(none)" } else { &svid.hint });
                    say!("  Expiry: {expires}");
                    if !dns.is_empty() {
                        say!("  DNS SANs: {}", dns.join(", "));
                    }
                }
            }
            Some(Err(status)) => {
                failed = true;
                eprintln!("{}", explain("FetchX509SVID", &status));
            }
            None => {
                failed = true;
                eprintln!("FetchX509SVID: the stream ended without a message");
            }
        },
        Err(status) => {
            failed = true;
            eprintln!("{}", explain("FetchX509SVID", &status));
        }
    }
    say!("Trust bundles:");
    match api.fetch_x509_bundles(client::request(X509BundlesRequest {})).await {
        Ok(stream) => match stream.into_inner().next().await {
            Some(Ok(message)) if message.bundles.is_empty() => say!("  No trust bundles were returned."),
            Some(Ok(message)) => {
                let mut bundles: Vec<_> = message.bundles.iter().collect();
                bundles.sort();
                for (td, der) in bundles {
                    say!("- {td}: {} CA certificate(s)", count_certificates(der));
                }
            }
            Some(Err(status)) => {
                failed = true;
                eprintln!("{}", explain("FetchX509Bundles", &status));
            }
            None => failed = true,
        },
        Err(status) => {
            failed = true;
            eprintln!("{}", explain("FetchX509Bundles", &status));
        }
    }
    if audiences.is_empty() {
        say!("JWT-SVIDs: pass --audience AUD to fetch them.");
    } else {
        say!("JWT-SVIDs for audience {}:", audiences.join(", "));
        let request = JwtsvidRequest {
            audience: audiences,
            spiffe_id: String::new(),
        };
        match api.fetch_jwtsvid(client::request(request)).await {
            Ok(response) => {
                let svids = response.into_inner().svids;
                if svids.is_empty() {
                    say!("  No JWT-SVIDs were returned.");
                }
                for svid in svids {
                    say!("- {}", svid.spiffe_id);
                    say!("  Hint: {}", if svid.hint.is_empty() { "(none)" } else { &svid.hint });
                    say!("  Token: {}", svid.svid);
                }
            }
            Err(status) => {
                failed = true;
                eprintln!("{}", explain("FetchJWTSVID", &status));
            }
        }
        say!("JWT bundles:");
        match api.fetch_jwt_bundles(client::request(JwtBundlesRequest {})).await {
            Ok(stream) => match stream.into_inner().next().await {
                Some(Ok(message)) if message.bundles.is_empty() => say!("  No JWT bundles were returned."),
                Some(Ok(message)) => {
                    for (td, jwks) in message.bundles {
                        let keys = serde_json::from_slice::<serde_json::Value>(&jwks)
                            .ok()
                            .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len))
                            .unwrap_or(0);
                        say!("- {td}: {keys} key(s)");
                    }
                }
                Some(Err(status)) => {
                    failed = true;
                    eprintln!("{}", explain("FetchJWTBundles", &status));
                }
                None => failed = true,
            },
            Err(status) => {
                failed = true;
                eprintln!("{}", explain("FetchJWTBundles", &status));
            }
        }
    }
    crate::cli::args::write_stdout(format_args!("{}", out));
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
