//! The issuer API's messages (`proto/issuer.proto`) and their conversions from and to the issuer's
//! own types, shared by the server (`issuer::server`) and the client (`agent::remote`). Errors
//! travel as a gRPC status with the variant in the `tbot-error` metadata, so the agent sees the
//! same `IssuerError` (transient or terminal, same hint) as it would in process.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tonic::{Code, Status};

use crate::error::Explain;
use crate::issuer::{Attributes, BotCertificate, Bundles, IssuerError, JwtSvid, Resolution, Resolved, X509Svid};

/// The generated messages, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("tbot.issuer.v1");
}

const ERROR_KEY: &str = "tbot-error";
const BOT_KEY: &str = "tbot-bot";

/// An issuer error as a gRPC status.
pub fn to_status(error: &IssuerError) -> Status {
    let (code, tag) = match error {
        // A store that may answer on a retry (behind its disk, unreachable, out of space) is the
        // issuer being unavailable for now, as gRPC means it; anything else is its failure.
        IssuerError::Store(e) if e.is_transient() => (Code::Unavailable, "unavailable"),
        IssuerError::Store(_) | IssuerError::Corrupt { .. } => (Code::Internal, "internal"),
        IssuerError::Crypto(_) => (Code::Internal, "crypto"),
        IssuerError::JoinRefused(_) => (Code::PermissionDenied, "join-refused"),
        IssuerError::StsUnavailable(_) => (Code::Unavailable, "sts-unavailable"),
        IssuerError::Unavailable(_) => (Code::Unavailable, "unavailable"),
        IssuerError::Limited(_) => (Code::ResourceExhausted, "limited"),
        IssuerError::Unauthenticated(_) => (Code::Unauthenticated, "unauthenticated"),
        IssuerError::Locked { .. } => (Code::PermissionDenied, "locked"),
        IssuerError::Denied(_) => (Code::PermissionDenied, "denied"),
        IssuerError::Invalid(_) => (Code::InvalidArgument, "invalid"),
    };
    // The message without the variant's own prefix: the client puts it back.
    let message = match error {
        IssuerError::JoinRefused(m)
        | IssuerError::Unavailable(m)
        | IssuerError::Limited(m)
        | IssuerError::Unauthenticated(m)
        | IssuerError::Denied(m)
        | IssuerError::Invalid(m)
        | IssuerError::Crypto(m) => m.clone(),
        IssuerError::Locked { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    let mut status = Status::new(code, message);
    status
        .metadata_mut()
        .insert(ERROR_KEY, tag.parse().expect("an ASCII tag"));
    if let IssuerError::Locked { bot, .. } = error
        && let Ok(value) = bot.parse()
    {
        status.metadata_mut().insert(BOT_KEY, value);
    }
    status
}

/// A gRPC status from the issuer API as the issuer error it stands for. A status without our tag
/// (a proxy, a transport failure) is the issuer being unreachable.
pub fn from_status(status: &Status) -> IssuerError {
    let message = status.message().to_owned();
    let tag = status.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok());
    match tag {
        Some("internal") => IssuerError::Unavailable(format!("the issuer failed: {message}")),
        Some("crypto") => IssuerError::Crypto(message),
        Some("join-refused") => IssuerError::JoinRefused(message),
        Some("sts-unavailable") => IssuerError::Unavailable(format!("the issuer cannot reach STS: {message}")),
        Some("unavailable") => IssuerError::Unavailable(message),
        Some("limited") => IssuerError::Limited(message),
        Some("unauthenticated") => IssuerError::Unauthenticated(message),
        Some("locked") => IssuerError::Locked {
            bot: status
                .metadata()
                .get(BOT_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            reason: message,
        },
        Some("denied") => IssuerError::Denied(message),
        Some("invalid") => IssuerError::Invalid(message),
        _ => IssuerError::Unavailable(match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => message,
            code => format!("{message} ({code:?}): is `proxy_server` a tbot issuer?"),
        }),
    }
}

/// Attributes as sent over the wire.
pub fn attributes_to_wire(attributes: &Attributes) -> Vec<proto::Attribute> {
    attributes
        .iter()
        .map(|(name, values)| proto::Attribute {
            name: name.to_owned(),
            values: values.to_vec(),
        })
        .collect()
}

/// Attributes from the wire: only `workload.*` ones (an agent asserts nothing else).
pub fn attributes_from_wire(attributes: &[proto::Attribute]) -> Attributes {
    let mut out = Attributes::new();
    for a in attributes.iter().filter(|a| a.name.starts_with("workload.")) {
        out.set_many(a.name.clone(), a.values.clone());
    }
    out
}

pub fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

pub fn from_unix(seconds: i64) -> Result<OffsetDateTime, IssuerError> {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|_| IssuerError::Unavailable(format!("the issuer sent a time out of range: {seconds}")))
}

/// A lifetime in whole seconds (at most a day is ever asked for).
pub fn seconds(ttl: Duration) -> u32 {
    ttl.as_secs().min(u64::from(u32::MAX)) as u32
}

pub fn holdings_to_wire(h: crate::issuer::Holdings) -> proto::HoldingsReport {
    proto::HoldingsReport {
        x509: h.x509.into_iter().collect(),
        jwt: h.jwt.into_iter().collect(),
        bot: h.bot,
        sequence: h.sequence,
    }
}

/// The key names a report may carry, at most, and how long each may be: an agent names the few
/// keys of one trust domain (a pin is 71 bytes, a `kid` 22).
pub const MAX_HELD_KEYS: usize = 16;
const MAX_HELD_NAME: usize = 128;

/// A report as the issuer takes it: refused whole when it is not what an agent sends.
pub fn holdings_from_wire(h: proto::HoldingsReport) -> Result<crate::issuer::Holdings, IssuerError> {
    if h.x509.len() + h.jwt.len() > MAX_HELD_KEYS {
        return Err(IssuerError::Invalid(format!(
            "a holdings report names {} keys; the limit is {MAX_HELD_KEYS}",
            h.x509.len() + h.jwt.len()
        )));
    }
    if let Some(long) = h
        .x509
        .keys()
        .chain(h.jwt.keys())
        .chain(std::iter::once(&h.bot))
        .find(|k| k.len() > MAX_HELD_NAME)
    {
        return Err(IssuerError::Invalid(format!(
            "a holdings report names a key of {} bytes; a key's name is at most {MAX_HELD_NAME}",
            long.len()
        )));
    }
    Ok(crate::issuer::Holdings {
        x509: h.x509.into_iter().collect(),
        jwt: h.jwt.into_iter().collect(),
        bot: h.bot,
        sequence: h.sequence,
    })
}

pub fn bundle_to_wire(b: &Bundles) -> proto::Bundle {
    proto::Bundle {
        trust_domain: b.trust_domain.clone(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_keys: b.jwt_keys.iter().map(Value::to_string).collect(),
        sequence: b.sequence,
        active_ca: b.active_ca as u32,
        active_kid: b.active_kid.clone(),
        crls: b.crls.to_vec(),
        revoked: b.revoked.iter().cloned().collect(),
        tainted_cas: b.tainted_cas.iter().map(|i| *i as u32).collect(),
        tainted_kids: b.tainted_kids.clone(),
        federated: b
            .federated
            .values()
            .map(|f| proto::Bundle {
                trust_domain: f.trust_domain.clone(),
                x509_authorities: f.x509_authorities.clone(),
                jwt_keys: f.jwt_keys.iter().map(Value::to_string).collect(),
                ..Default::default()
            })
            .collect(),
    }
}

fn jwks_from_wire(keys: &[String]) -> Result<Vec<Value>, IssuerError> {
    keys.iter()
        .map(|k| serde_json::from_str(k))
        .collect::<Result<Vec<Value>, _>>()
        .map_err(|e| IssuerError::Unavailable(format!("the issuer sent a JWT key that is not JSON: {e}")))
}

pub fn bundle_from_wire(b: proto::Bundle) -> Result<Bundles, IssuerError> {
    let mut federated = std::collections::BTreeMap::new();
    for f in b.federated {
        let bundle = crate::issuer::TrustBundle {
            jwt_keys: jwks_from_wire(&f.jwt_keys)?,
            trust_domain: f.trust_domain,
            x509_authorities: f.x509_authorities,
        };
        federated.insert(bundle.trust_domain.clone(), std::sync::Arc::new(bundle));
    }
    Ok(Bundles {
        jwt_keys: jwks_from_wire(&b.jwt_keys)?,
        trust_domain: b.trust_domain,
        x509_authorities: b.x509_authorities,
        sequence: b.sequence,
        active_ca: b.active_ca as usize,
        active_kid: b.active_kid,
        federated,
        crls: std::sync::Arc::new(b.crls),
        revoked: std::sync::Arc::new(b.revoked.into_iter().collect()),
        tainted_cas: b.tainted_cas.into_iter().map(|i| i as usize).collect(),
        tainted_kids: b.tainted_kids,
    })
}

pub fn bot_to_wire(c: &BotCertificate, bundle: &Bundles) -> proto::BotCertificate {
    proto::BotCertificate {
        certificate: c.der.clone(),
        bot: c.bot.clone(),
        roles: c.roles.clone(),
        generation: c.generation,
        not_after: unix(c.not_after),
        join: c.join.iter().map(|(k, v)| (k.to_owned(), v.join(","))).collect(),
        bundle: Some(bundle_to_wire(bundle)),
        instance: c.instance.clone(),
        connection_bound: false,
    }
}

/// A bot certificate from the wire, with the bundle it came with.
pub fn bot_from_wire(c: proto::BotCertificate) -> Result<(BotCertificate, Option<Bundles>), IssuerError> {
    let mut join = Attributes::new();
    for (k, v) in &c.join {
        join.set(k.clone(), v);
    }
    let bundle = c.bundle.map(bundle_from_wire).transpose()?;
    Ok((
        BotCertificate {
            der: c.certificate,
            bot: c.bot,
            roles: c.roles,
            generation: c.generation,
            not_after: from_unix(c.not_after)?,
            join,
            instance: c.instance,
        },
        bundle,
    ))
}

pub fn resolved_to_wire(r: Resolution) -> proto::ResolveResponse {
    proto::ResolveResponse {
        identities: r
            .identities
            .into_iter()
            .map(|r| proto::Resolved {
                name: r.name,
                reads: r.reads,
            })
            .collect(),
        decided_on: r.decided_on.map(|attributes| proto::DecidedOn { attributes }),
    }
}

pub fn resolved_from_wire(r: proto::ResolveResponse) -> Resolution {
    Resolution {
        identities: r
            .identities
            .into_iter()
            .map(|r| Resolved {
                name: r.name,
                reads: r.reads,
            })
            .collect(),
        decided_on: r.decided_on.map(|d| d.attributes),
    }
}

pub fn x509_to_wire(s: X509Svid) -> proto::X509Svid {
    proto::X509Svid {
        identity: s.identity,
        spiffe_id: s.spiffe_id,
        hint: s.hint.unwrap_or_default(),
        certificate: s.certificate,
        not_after: unix(s.not_after),
    }
}

pub fn x509_from_wire(s: proto::X509Svid) -> Result<X509Svid, IssuerError> {
    Ok(X509Svid {
        identity: s.identity,
        spiffe_id: s.spiffe_id,
        hint: (!s.hint.is_empty()).then_some(s.hint),
        certificate: s.certificate,
        not_after: from_unix(s.not_after)?,
    })
}

pub fn jwt_to_wire(s: JwtSvid) -> proto::JwtSvid {
    proto::JwtSvid {
        identity: s.identity,
        spiffe_id: s.spiffe_id,
        hint: s.hint.unwrap_or_default(),
        token: s.token,
        expires: unix(s.expires),
    }
}

pub fn jwt_from_wire(s: proto::JwtSvid) -> Result<JwtSvid, IssuerError> {
    Ok(JwtSvid {
        identity: s.identity,
        spiffe_id: s.spiffe_id,
        hint: (!s.hint.is_empty()).then_some(s.hint),
        token: s.token,
        expires: from_unix(s.expires)?,
    })
}

/// Labels as the wire carries them.
pub fn labels(map: &BTreeMap<String, String>) -> proto::Labels {
    proto::Labels {
        labels: map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    /// A store that may answer on a retry travels as `UNAVAILABLE`, and the agent retries; a store
    /// that will not is the issuer's failure (`INTERNAL`). Both keep the store's words.
    #[test]
    fn a_transient_store_error_is_the_issuer_unavailable_and_any_other_its_failure() {
        let behind = IssuerError::Store(StoreError::Behind {
            store: "directory /var/lib/tbot".into(),
            bytes: 64 << 20,
            transactions: 64,
        });
        let status = to_status(&behind);
        assert_eq!(status.code(), Code::Unavailable);
        let seen = from_status(&status);
        assert!(seen.is_transient(), "{seen}");
        assert!(seen.to_string().contains("is behind its disk"), "{seen}");

        let stopped = IssuerError::Store(StoreError::Stopped {
            store: "directory /var/lib/tbot".into(),
            thread: "log writer",
        });
        let status = to_status(&stopped);
        assert_eq!(status.code(), Code::Internal);
        let seen = from_status(&status).to_string();
        assert!(
            seen.contains("the issuer failed") && seen.contains("its log writer stopped"),
            "{seen}"
        );
    }
}
