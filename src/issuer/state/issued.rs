//! The issuance log: every X509-SVID, JWT-SVID and bot certificate the issuer signed — serial (or
//! the JWT's `jti`), SPIFFE ID, bot and instance, the `workload_identity` and the workload
//! attributes that decided it, when it was issued and when it expires — so an operator can find what
//! to revoke, or answer "what did this bot instance get last night".
//!
//! Records are said in the daemon's log at INFO as they are made, and kept in the issuer's store as
//! JSON lines: what one process issued in a second is one key, `issuer/<trust domain>@issued/
//! <written, ms>-<last expiry, s>-<writer>`, outside the trust domain's own directory (which every
//! replica follows into memory). The directory backend keeps each as a file; on etcd every replica
//! writes its own and reads them all. The log keeps what is still valid plus [`HISTORY`], within
//! [`MAX_BYTES`] (the oldest go first, with a WARN); records not yet written when the process dies
//! are only in its log.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::kv::{Op, SharedKv};
use crate::store::StoreError;

/// How long a record is kept after what it records expired, unless `cluster.spec.issuance_log.history`
/// says.
pub const HISTORY: time::Duration = time::Duration::hours(24);
/// The most the log may take in the store, unless `cluster.spec.issuance_log.max_mib` says.
pub const MAX_BYTES: usize = 64 << 20;
/// How often what was issued is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The most one key holds: a second's records are split into keys of at most this (etcd refuses a
/// request over 1.5 MiB by default).
pub const MAX_KEY_BYTES: usize = 512 << 10;
/// The most records kept in memory while the store does not take them; the oldest go first.
pub const MAX_PENDING: usize = 100_000;

/// What was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssuedKind {
    X509Svid,
    JwtSvid,
    BotCertificate,
}

impl IssuedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IssuedKind::X509Svid => "x509-svid",
            IssuedKind::JwtSvid => "jwt-svid",
            IssuedKind::BotCertificate => "bot-certificate",
        }
    }
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub kind: IssuedKind,
    /// The certificate's serial number in lower-case hex, or the JWT's `jti`.
    pub serial: String,
    /// The SVID's SPIFFE ID (empty for a bot certificate).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spiffe_id: String,
    pub bot: String,
    /// The bot instance (one per join).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// The `workload_identity` an SVID was issued for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
    /// The workload attributes the identity's rules and templates read, as the agent attested them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, Vec<String>>,
    /// A JWT-SVID's audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

/// Which records a reader wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub bot: Option<String>,
    pub spiffe_id: Option<String>,
    /// Issued at or after.
    pub since: Option<OffsetDateTime>,
}

impl Filter {
    fn keeps(&self, r: &Issued) -> bool {
        self.bot.as_ref().is_none_or(|b| &r.bot == b)
            && self.spiffe_id.as_ref().is_none_or(|id| &r.spiffe_id == id)
            && self.since.is_none_or(|t| r.issued_at >= t)
    }
}

/// The log of one trust domain's issuer process.
pub struct IssuanceLog {
    kv: SharedKv,
    /// `issuer/<trust domain>@issued/`.
    prefix: String,
    /// This process, in the names of its keys.
    writer: String,
    /// Not yet written, oldest first: a queue, so that dropping the oldest at the cap and taking a
    /// key's worth at a flush cost what they take, not what stays (with the store away for long,
    /// both happen on a full queue).
    pending: Mutex<VecDeque<Issued>>,
    /// Every key of the log this process knows of (those there at its start, and its own since),
    /// with its size: what [`IssuanceLog::prune`] looks at.
    keys: Mutex<BTreeMap<String, usize>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
    /// When each certificate this process knows of expires, by serial (those in the store at its
    /// start, and its own since): a revocation ends when what it names has expired. Keyed by the
    /// serial's value ([`serial_value`]): two or three entries per agent, no string each.
    expiries: Mutex<std::collections::HashMap<u128, OffsetDateTime>>,
    /// The history kept and the size cap (see [`IssuanceLog::set_limits`]).
    limits: Mutex<(time::Duration, usize)>,
}

/// A certificate serial (hex) as a number: every serial tbot signs is 128 bits
/// ([`crate::issuer::keys::ca::random_serial`]). Anything else (not hex, longer) is no certificate
/// of this issuer, whose expiry it therefore does not know.
fn serial_value(serial: &str) -> Option<u128> {
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(serial, 16).ok()
}

/// Drops the oldest unwritten records past [`MAX_PENDING`], saying so.
fn cap(pending: &mut VecDeque<Issued>) {
    if pending.len() > MAX_PENDING {
        let dropped = pending.len() - MAX_PENDING;
        pending.drain(..dropped);
        tracing::warn!(
            dropped,
            "the store has not taken the issuance log for a while: its oldest unwritten records are dropped (they are in this log at INFO)"
        );
    }
}

/// The store prefix of a trust domain's log (`@` is in no trust domain name, so it is never a
/// trust domain's own directory).
pub fn prefix_of(trust_domain: &str) -> String {
    format!("issuer/{trust_domain}@issued/")
}

/// The unix time a key says its records expire by.
fn expiry_of(key: &str, prefix: &str) -> Option<i64> {
    key.strip_prefix(prefix)?.split('-').nth(1)?.parse().ok()
}

impl IssuanceLog {
    /// The log of `trust_domain` in `kv`, knowing the keys already there.
    pub async fn open(kv: SharedKv, trust_domain: &str) -> Result<IssuanceLog, StoreError> {
        let prefix = prefix_of(trust_domain);
        let (entries, _) = kv.list(&prefix).await?;
        Ok(IssuanceLog::with(kv, trust_domain, entries))
    }

    /// A log that knows none of the keys already in the store (they could not be read): it writes
    /// and prunes its own, and lists them all when asked.
    pub fn unread(kv: SharedKv, trust_domain: &str) -> IssuanceLog {
        IssuanceLog::with(kv, trust_domain, Vec::new())
    }

    fn with(kv: SharedKv, trust_domain: &str, entries: Vec<crate::kv::Entry>) -> IssuanceLog {
        let prefix = prefix_of(trust_domain);
        let mut expiries = std::collections::HashMap::new();
        for entry in &entries {
            for line in entry.value.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                if let Ok(r) = serde_json::from_slice::<Issued>(line)
                    && r.kind != IssuedKind::JwtSvid
                    && let Some(serial) = serial_value(&r.serial)
                {
                    expiries.insert(serial, r.not_after);
                }
            }
        }
        let keys = entries.into_iter().map(|e| (e.key, e.value.len())).collect();
        let mut writer = [0u8; 4];
        let _ = aws_lc_rs::rand::fill(&mut writer);
        IssuanceLog {
            kv,
            prefix,
            writer: crate::hex(&writer),
            pending: Mutex::new(VecDeque::new()),
            keys: Mutex::new(keys),
            flushing: tokio::sync::Mutex::new(()),
            expiries: Mutex::new(expiries),
            limits: Mutex::new((HISTORY, MAX_BYTES)),
        }
    }

    /// Records what was issued: said in the log now, written to the store within [`FLUSH_EVERY`].
    pub fn record(&self, issued: Issued) {
        tracing::info!(
            kind = issued.kind.as_str(),
            serial = %issued.serial,
            spiffe_id = %issued.spiffe_id,
            bot = %issued.bot,
            instance = %issued.instance,
            identity = %issued.identity,
            not_after = %crate::rfc3339(issued.not_after),
            "issued"
        );
        if issued.kind != IssuedKind::JwtSvid
            && let Some(serial) = serial_value(&issued.serial)
        {
            self.expiries
                .lock()
                .expect("issuance log poisoned")
                .insert(serial, issued.not_after);
        }
        let mut pending = self.pending.lock().expect("issuance log poisoned");
        pending.push_back(issued);
        cap(&mut pending);
    }

    /// What the keys of the log this process knows of take in the store.
    pub fn bytes(&self) -> usize {
        self.keys.lock().expect("issuance log poisoned").values().sum()
    }

    /// When the certificate with this serial (hex, either case, leading zeros or not) expires, if
    /// this process knows it.
    pub fn expiry(&self, serial: &str) -> Option<OffsetDateTime> {
        let serial = serial_value(serial)?;
        self.expiries
            .lock()
            .expect("issuance log poisoned")
            .get(&serial)
            .copied()
    }

    /// Writes what is pending as one key, then drops what is past its history or over the cap.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let mut batch = std::mem::take(&mut *self.pending.lock().expect("issuance log poisoned"));
        let written = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let mut part = 0;
        while !batch.is_empty() {
            // As many records as fit in one key (at least one).
            let mut value = Vec::new();
            let mut taken = 0;
            for record in batch.iter() {
                let before = value.len();
                serde_json::to_writer(&mut value, record).expect("a record serializes");
                value.push(b'\n');
                if value.len() > MAX_KEY_BYTES && taken > 0 {
                    value.truncate(before);
                    break;
                }
                taken += 1;
            }
            let last = batch
                .range(..taken)
                .map(|r| r.not_after.unix_timestamp())
                .max()
                .unwrap_or(0);
            let key = format!("{}{written:013}-{last:010}-{}-{part}", self.prefix, self.writer);
            // The store keeps the value as it is given: without the room it grew into (up to as
            // much again), which a memory or directory store would hold until the key goes.
            value.shrink_to_fit();
            let size = value.len();
            if let Err(e) = self.kv.txn(Vec::new(), vec![Op::put(&key, value)]).await {
                // Kept for the next flush, before what came since: the store may be back by then.
                let mut pending = self.pending.lock().expect("issuance log poisoned");
                let newer = std::mem::replace(&mut *pending, batch);
                pending.extend(newer);
                cap(&mut pending);
                return Err(e);
            }
            self.keys.lock().expect("issuance log poisoned").insert(key, size);
            batch.drain(..taken);
            part += 1;
        }
        self.prune().await
    }

    /// Keeps `history` after expiry and at most `max_bytes` (`cluster.spec.issuance_log`), from the
    /// next flush on.
    pub fn set_limits(&self, history: Duration, max_bytes: usize) {
        let history = time::Duration::try_from(history).unwrap_or(HISTORY);
        *self.limits.lock().expect("issuance log poisoned") = (history, max_bytes);
    }

    /// Drops the keys whose records all expired more than the history ago, then the oldest while
    /// the log is over its size cap.
    async fn prune(&self) -> Result<(), StoreError> {
        let (history, max_bytes) = *self.limits.lock().expect("issuance log poisoned");
        let now = OffsetDateTime::now_utc();
        self.expiries
            .lock()
            .expect("issuance log poisoned")
            .retain(|_, not_after| *not_after + history > now);
        let gone: Vec<String> = {
            let keys = self.keys.lock().expect("issuance log poisoned");
            let horizon = (OffsetDateTime::now_utc() - history).unix_timestamp();
            let mut gone: Vec<String> = keys
                .keys()
                .filter(|k| expiry_of(k, &self.prefix).is_some_and(|e| e < horizon))
                .cloned()
                .collect();
            let mut total: usize = keys.iter().filter(|(k, _)| !gone.contains(k)).map(|(_, s)| s).sum();
            for (key, size) in keys.iter() {
                if total <= max_bytes {
                    break;
                }
                if !gone.contains(key) {
                    tracing::warn!(key = %key, "the issuance log is over its size cap: its oldest records are dropped");
                    gone.push(key.clone());
                    total -= size;
                }
            }
            gone
        };
        if gone.is_empty() {
            return Ok(());
        }
        let ops = gone.iter().cloned().map(Op::Delete).collect();
        self.kv.txn(Vec::new(), ops).await?;
        let mut keys = self.keys.lock().expect("issuance log poisoned");
        for key in gone {
            keys.remove(&key);
        }
        Ok(())
    }

    /// The records `filter` keeps, oldest first: those in the store (every replica's) and those
    /// not written yet. Not during a flush, whose records are in neither place until it is done.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<Issued>, StoreError> {
        let _no_flush = self.flushing.lock().await;
        let (entries, _) = self.kv.list(&self.prefix).await?;
        let mut out = Vec::new();
        for entry in entries {
            for line in entry.value.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Issued>(line) {
                    Ok(r) if filter.keeps(&r) => out.push(r),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "an issuance log line does not parse; it is skipped")
                    }
                }
            }
        }
        out.extend(
            self.pending
                .lock()
                .expect("issuance log poisoned")
                .iter()
                .filter(|r| filter.keeps(r))
                .cloned(),
        );
        out.sort_by_key(|r| r.issued_at);
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
