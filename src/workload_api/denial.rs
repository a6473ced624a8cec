//! What a refused Workload API caller is told: the security header's check, the status of an
//! issuer's refusal, and what each attestor found about the caller.

use tonic::{Request, Status};

use super::SECURITY_HEADER;
use super::listener::Attested;
use crate::error::Explain;
use crate::issuer::IssuerError;

/// The header check every call starts with: exactly one value, exactly `true`.
pub(super) fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    let values: Vec<_> = request.metadata().get_all(SECURITY_HEADER).iter().collect();
    match values.as_slice() {
        [one] if one.as_bytes() == b"true" => Ok(()),
        [] => Err(Status::invalid_argument(format!(
            "security header missing from request: set `{SECURITY_HEADER}: true`"
        ))),
        _ => Err(Status::invalid_argument(format!(
            "security header `{SECURITY_HEADER}` must be exactly one value `true`"
        ))),
    }
}

/// The gRPC status for an issuer error, with what the operator can do about it.
pub(super) fn status(error: IssuerError) -> Status {
    let message = error.explain();
    if error.is_transient() {
        Status::unavailable(message)
    } else {
        Status::permission_denied(message)
    }
}

/// What each attestor found about a caller, for denials: `unix` (uid, gid, binary), and for each of
/// `systemd`, `docker`, `podman`, `kubernetes` that answered, what it found or that it found
/// nothing; and each attestor that could not be asked, with why (an engine's socket refused, a
/// kubelet's 403), as it set nothing.
pub(super) fn attested_summary(attested: &Attested) -> String {
    let workload = &attested.attributes;
    let get = |name: &str| {
        workload
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.first().cloned())
    };
    let mut parts = vec![format!(
        "unix: uid {}, gid {}, binary {}",
        get("workload.unix.uid").unwrap_or_else(|| "?".into()),
        get("workload.unix.gid").unwrap_or_else(|| "?".into()),
        get("workload.unix.binary_path").unwrap_or_else(|| "(unreadable)".into()),
    )];
    let found = |attestor: &str, what: Option<String>| match get(&format!("workload.{attestor}.attested")).as_deref() {
        Some("true") => format!("{attestor}: {}", what.unwrap_or_default()),
        _ => format!("{attestor}: none found"),
    };
    let ran = |attestor: &str| {
        workload
            .iter()
            .any(|(n, _)| n.starts_with(&format!("workload.{attestor}.")))
    };
    if ran("systemd") {
        parts.push(found(
            "systemd",
            get("workload.systemd.service").map(|s| format!("service `{s}`")),
        ));
    }
    for engine in ["docker", "podman"] {
        if ran(engine) {
            let name = get(&format!("workload.{engine}.container.name"));
            parts.push(found(engine, name.map(|n| format!("container `{n}`"))));
        }
    }
    if ran("kubernetes") {
        let pod = get("workload.kubernetes.pod_name").map(|p| {
            format!(
                "pod `{}/{p}`, container `{}`",
                get("workload.kubernetes.namespace").unwrap_or_default(),
                get("workload.kubernetes.container.name").unwrap_or_default()
            )
        });
        parts.push(found("kubernetes", pod));
    }
    parts.extend(attested.unasked.iter().cloned());
    parts.join("; ").escape_debug().to_string()
}
