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
