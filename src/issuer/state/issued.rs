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
mod tests {
    use super::*;

    fn record(serial: &str, bot: &str, not_after: OffsetDateTime) -> Issued {
        Issued {
            kind: IssuedKind::X509Svid,
            serial: serial.into(),
            spiffe_id: format!("spiffe://example.org/{bot}"),
            bot: bot.into(),
            instance: "i1".into(),
            identity: "web".into(),
            attributes: BTreeMap::from([("workload.unix.uid".to_owned(), vec!["1000".to_owned()])]),
            audience: Vec::new(),
            issued_at: OffsetDateTime::now_utc(),
            not_after,
        }
    }

    /// The expiry of a certificate is found by its serial as a revocation spells it (lower- or
    /// upper-case, with leading zeros) and as a record wrote it; what no serial of this issuer can
    /// be is not found, at open or after, so a revocation of it stays.
    #[tokio::test]
    async fn an_expiry_is_found_by_the_serials_value_and_a_serial_no_issuer_made_has_none() {
        let kv: SharedKv = std::sync::Arc::new(crate::kv::MemoryKv::new());
        let log = IssuanceLog::open(kv.clone(), "example.org").await.unwrap();
        let end = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let ours = "40a1b2c3d4e5f60718293a4b5c6d7e8f";
        log.record(record(ours, "web", end));
        log.record(record("4000000000000000000000000000000000", "web", end));
        log.record(record("not hex", "web", end));
        log.flush().await.unwrap();
        for log in [&log, &IssuanceLog::open(kv, "example.org").await.unwrap()] {
            assert_eq!(log.expiry(ours), Some(end));
            assert_eq!(log.expiry(&ours.to_uppercase()), Some(end));
            assert_eq!(log.expiry(&format!("00{ours}")), Some(end));
            assert_eq!(log.expiry("40a1"), None);
            assert_eq!(log.expiry("4000000000000000000000000000000000"), None, "over 128 bits");
            assert_eq!(log.expiry("not hex"), None);
            assert_eq!(log.expiry(""), None);
        }
    }

    #[tokio::test]
    async fn records_are_written_read_back_filtered_and_dropped_after_their_history() {
        let kv: SharedKv = std::sync::Arc::new(crate::kv::MemoryKv::new());
        let log = IssuanceLog::open(kv.clone(), "example.org").await.unwrap();
        let now = OffsetDateTime::now_utc();
        log.record(record("aa", "web", now + time::Duration::hours(1)));
        log.record(record("bb", "db", now + time::Duration::hours(1)));
        // Readable before it is written, and after.
        assert_eq!(log.list(&Filter::default()).await.unwrap().len(), 2);
        log.flush().await.unwrap();
        let (entries, _) = kv.list("issuer/example.org@issued/").await.unwrap();
        assert_eq!(entries.len(), 1, "one key per flush");
        let db = Filter {
            bot: Some("db".into()),
            ..Filter::default()
        };
        let got = log.list(&db).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].serial, "bb");
        assert_eq!(got[0].attributes["workload.unix.uid"], ["1000"]);

        // Another process (a restart, a replica) reads what this one wrote.
        let again = IssuanceLog::open(kv.clone(), "example.org").await.unwrap();
        assert_eq!(again.list(&Filter::default()).await.unwrap().len(), 2);

        // Long expired: gone at the next flush.
        log.record(record("cc", "old", now - HISTORY - time::Duration::hours(1)));
        log.flush().await.unwrap();
        log.flush().await.unwrap();
        let serials: Vec<String> = log
            .list(&Filter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        assert_eq!(serials, ["aa", "bb"]);
    }

    /// A memory store whose writes wait until the test lets them through, and fail while `down`.
    struct SlowWrites {
        inner: crate::kv::MemoryKv,
        gate: tokio::sync::Semaphore,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl crate::kv::Kv for SlowWrites {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        async fn get(&self, key: &str) -> Result<Option<crate::kv::Entry>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<crate::kv::Entry>, i64), StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, conditions: Vec<crate::kv::Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
            self.gate.acquire().await.expect("gate open").forget();
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Unavailable {
                    store: self.describe(),
                    reason: "down for the test".into(),
                });
            }
            self.inner.txn(conditions, ops).await
        }
        async fn watch(
            &self,
            prefix: &str,
            from: i64,
        ) -> Result<tokio::sync::mpsc::Receiver<crate::kv::WatchItem>, StoreError> {
            self.inner.watch(prefix, from).await
        }
        async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
            self.inner.grant(ttl).await
        }
        async fn keep_alive(&self, lease: i64) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
            self.inner.revoke(lease).await
        }
        async fn compact(&self, revision: i64) -> Result<(), StoreError> {
            self.inner.compact(revision).await
        }
    }

    /// A log on a store whose writes wait for the test's permits.
    async fn gated() -> (std::sync::Arc<SlowWrites>, std::sync::Arc<IssuanceLog>) {
        let kv = std::sync::Arc::new(SlowWrites {
            inner: crate::kv::MemoryKv::new(),
            gate: tokio::sync::Semaphore::new(0),
            down: false.into(),
        });
        let log = std::sync::Arc::new(IssuanceLog::open(kv.clone(), "example.org").await.unwrap());
        (kv, log)
    }

    /// With the store away, the log keeps the newest [`MAX_PENDING`] records. A flush that writes
    /// its first key and then fails puts the rest of its batch back before what was recorded
    /// meanwhile; when the store is back, the next flush writes them all: every record once, in the
    /// order recorded.
    #[tokio::test]
    async fn with_the_store_away_the_oldest_go_first_and_the_rest_are_written_in_order() {
        use std::sync::atomic::Ordering::Relaxed;
        let (kv, log) = gated().await;
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        for i in 0..MAX_PENDING + 3 {
            log.record(record(&format!("{i:08x}"), "web", later));
        }
        assert_eq!(log.pending.lock().unwrap().len(), MAX_PENDING);
        let flush = tokio::spawn({
            let log = log.clone();
            async move { log.flush().await }
        });
        while !log.pending.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Recorded while the flush waits on the store.
        log.record(record("ffffffff", "web", later));
        // The first key goes through; the second fails.
        kv.gate.add_permits(1);
        let prefix = "issuer/example.org@issued/";
        while crate::kv::Kv::list(&kv.inner, prefix).await.unwrap().0.is_empty() {
            tokio::task::yield_now().await;
        }
        kv.down.store(true, Relaxed);
        kv.gate.add_permits(1);
        let err = flush.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("down for the test"), "{err}");
        {
            let pending = log.pending.lock().unwrap();
            assert!(
                pending.len() < MAX_PENDING,
                "the first key was written: {}",
                pending.len()
            );
            assert_eq!(pending.back().unwrap().serial, "ffffffff", "what came since goes last");
        }

        kv.down.store(false, Relaxed);
        kv.gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
        log.flush().await.unwrap();
        assert!(log.pending.lock().unwrap().is_empty());
        let (mut keys, _) = crate::kv::Kv::list(&kv.inner, prefix).await.unwrap();
        assert!(keys.len() > 2, "{} keys: the records need more than two", keys.len());
        keys.sort_by_key(|k| k.mod_revision);
        let mut serials = Vec::new();
        for key in &keys {
            for line in key.value.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                serials.push(serde_json::from_slice::<Issued>(line).unwrap().serial);
            }
        }
        let expected: Vec<String> = (3..MAX_PENDING + 3)
            .map(|i| format!("{i:08x}"))
            .chain(["ffffffff".to_owned()])
            .collect();
        assert_eq!(serials.len(), expected.len());
        assert!(serials == expected, "the wrong records were written, or out of order");
    }

    #[tokio::test]
    async fn a_listing_during_a_flush_misses_none_of_the_records_being_written() {
        let (kv, log) = gated().await;
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        for serial in ["aa", "bb", "cc"] {
            log.record(record(serial, "web", later));
        }
        // The flush has taken the records and waits on the store.
        let flush = tokio::spawn({
            let log = log.clone();
            async move { log.flush().await }
        });
        while !log.pending.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let listing = tokio::spawn({
            let log = log.clone();
            async move { log.list(&Filter::default()).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        kv.gate.add_permits(16);
        flush.await.unwrap().unwrap();
        assert_eq!(listing.await.unwrap().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_busy_second_is_written_as_several_keys_none_over_the_limit() {
        let kv: SharedKv = std::sync::Arc::new(crate::kv::MemoryKv::new());
        let log = IssuanceLog::open(kv.clone(), "example.org").await.unwrap();
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        for i in 0..3000 {
            let mut r = record(&format!("{i:x}"), "web", later);
            r.attributes
                .insert("workload.unix.binary_path".into(), vec!["/x".repeat(150)]);
            log.record(r);
        }
        log.flush().await.unwrap();
        let (entries, _) = kv.list("issuer/example.org@issued/").await.unwrap();
        assert!(entries.len() >= 2, "{} keys", entries.len());
        assert!(entries.iter().all(|e| e.value.len() <= MAX_KEY_BYTES));
        assert_eq!(log.list(&Filter::default()).await.unwrap().len(), 3000);
    }

    #[tokio::test]
    async fn the_history_and_the_size_cap_are_the_clusters() {
        let kv: SharedKv = std::sync::Arc::new(crate::kv::MemoryKv::new());
        let log = IssuanceLog::open(kv.clone(), "example.org").await.unwrap();
        let now = OffsetDateTime::now_utc();
        // Expired two hours ago: kept with the default day of history, gone with one hour.
        log.record(record("old", "web", now - time::Duration::hours(2)));
        log.flush().await.unwrap();
        assert_eq!(log.list(&Filter::default()).await.unwrap().len(), 1);
        log.set_limits(Duration::from_secs(3600), MAX_BYTES);
        log.flush().await.unwrap();
        assert!(log.list(&Filter::default()).await.unwrap().is_empty());
        // Over a cap of 1 byte nothing fits: every key goes, the oldest first.
        log.record(record("a", "web", now + time::Duration::hours(1)));
        log.flush().await.unwrap();
        assert_eq!(log.list(&Filter::default()).await.unwrap().len(), 1);
        log.set_limits(Duration::from_secs(3600), 1);
        log.record(record("b", "web", now + time::Duration::hours(1)));
        log.flush().await.unwrap();
        let (entries, _) = kv.list("issuer/example.org@issued/").await.unwrap();
        assert!(entries.is_empty(), "{} keys kept over a 1-byte cap", entries.len());
    }
}
