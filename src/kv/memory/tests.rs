use super::*;

fn open(dir: &std::path::Path) -> MemoryKv {
    MemoryKv::directory(Store::open(dir).unwrap(), "issuer/").unwrap()
}

#[tokio::test]
async fn a_directory_log_is_replayed_over_the_files_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .write("issuer/x/a.json", b"old", crate::store::Secrecy::Public)
            .unwrap();
        store
            .write("issuer/x/b.json", b"gone", crate::store::Secrecy::Public)
            .unwrap();
    }
    // What a process killed before bringing its files up to date leaves, with the half-written
    // record of a transaction it never answered.
    let mut log = Vec::new();
    wal::encode(
        &[Op::put("issuer/x/a.json", "new"), Op::Delete("issuer/x/b.json".into())],
        "issuer/",
        &mut log,
    )
    .unwrap();
    wal::encode(&[Op::put("issuer/x/ca-1.key", "secret")], "issuer/", &mut log).unwrap();
    let mut torn = Vec::new();
    wal::encode(&[Op::put("issuer/x/never.json", "x")], "issuer/", &mut torn).unwrap();
    log.extend_from_slice(&torn[..torn.len() / 2]);
    std::fs::write(dir.path().join("issuer.1.wal"), &log).unwrap();

    let kv = open(dir.path());
    let (entries, _) = kv.list("issuer/").await.unwrap();
    let found: Vec<(&str, &[u8])> = entries.iter().map(|e| (e.key.as_str(), &e.value[..])).collect();
    assert_eq!(
        found,
        [("issuer/x/a.json", &b"new"[..]), ("issuer/x/ca-1.key", b"secret")]
    );
    // The files say the same, and the log is a new, empty one.
    let file = |name: &str| std::fs::read(dir.path().join(name)).ok();
    assert_eq!(file("issuer/x/a.json").as_deref(), Some(&b"new"[..]));
    assert_eq!(file("issuer/x/b.json"), None);
    assert_eq!(file("issuer/x/never.json"), None);
    use std::os::unix::fs::PermissionsExt;
    for (name, mode) in [("issuer/x/ca-1.key", 0o600), ("issuer.2.wal", 0o600)] {
        let meta = std::fs::metadata(dir.path().join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    assert_eq!(file("issuer.1.wal"), None);
    assert_eq!(file("issuer.2.wal").unwrap().len(), 0);
}

#[tokio::test]
async fn a_damaged_older_log_or_a_key_outside_the_scope_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let mut whole = Vec::new();
    wal::encode(&[Op::put("issuer/x/a.json", "1")], "issuer/", &mut whole).unwrap();
    // A newer log follows a damaged one: what was after the damage is lost, so say so.
    std::fs::write(dir.path().join("issuer.1.wal"), &whole[..whole.len() - 1]).unwrap();
    std::fs::write(dir.path().join("issuer.2.wal"), &whole).unwrap();
    let err = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/")
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("issuer.1.wal"), "{err}");
    // A record that names a file outside the scope.
    let mut outside = Vec::new();
    wal::encode(&[Op::put("issuer/../lock", "x")], "issuer/", &mut outside).unwrap();
    std::fs::remove_file(dir.path().join("issuer.1.wal")).unwrap();
    std::fs::write(dir.path().join("issuer.2.wal"), &outside).unwrap();
    let err = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/")
        .err()
        .unwrap();
    assert!(err.to_string().contains("outside `issuer/`"), "{err}");
}

#[tokio::test]
async fn a_closed_directory_store_refuses_writes_and_lets_go_of_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let kv = open(dir.path());
    kv.txn(vec![], vec![Op::put("issuer/x/a.json", "1")]).await.unwrap();
    kv.close();
    let err = kv.txn(vec![], vec![Op::put("issuer/x/b.json", "2")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed { .. }), "{err}");
    assert_eq!(
        kv.get("issuer/x/a.json").await.unwrap().unwrap().value,
        b"1",
        "reads go on"
    );
    // The directory is free while this store still exists.
    let again = open(dir.path());
    assert_eq!(again.get("issuer/x/a.json").await.unwrap().unwrap().value, b"1");
    assert_eq!(again.get("issuer/x/b.json").await.unwrap(), None);
}

/// `storage.type: memory`: the memory `Store` is read at open and holds no copy of what is
/// written after; closed, the store refuses writes as a directory's does.
#[tokio::test]
async fn a_store_on_memory_keeps_its_keys_itself_and_refuses_writes_once_closed() {
    let store = Store::memory();
    store
        .write("issuer/x/old.json", b"0", crate::store::Secrecy::Public)
        .unwrap();
    let kv = MemoryKv::directory(store.clone(), "issuer/").unwrap();
    assert_eq!(kv.get("issuer/x/old.json").await.unwrap().unwrap().value, b"0");
    kv.txn(vec![], vec![Op::put("issuer/x/a.json", "1")]).await.unwrap();
    assert_eq!(kv.get("issuer/x/a.json").await.unwrap().unwrap().value, b"1");
    assert_eq!(store.read("issuer/x/a.json").unwrap(), None, "no second copy");
    kv.close();
    let err = kv.txn(vec![], vec![Op::put("issuer/x/b.json", "2")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed { .. }), "{err}");
    assert_eq!(kv.get("issuer/x/b.json").await.unwrap(), None);
}

#[tokio::test]
async fn a_key_that_names_no_file_inside_the_scope_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kv = open(dir.path());
    kv.txn(vec![], vec![Op::put("issuer/x/a.json", "1")]).await.unwrap();
    let (_, before) = kv.list("").await.unwrap();
    for key in ["issuer/../lock", "issuer//a", "issuer/x/./a", "issuer/"] {
        // With a good write beside it: the whole transaction is refused.
        let ops = vec![Op::put("issuer/x/b.json", "2"), Op::put(key, "x")];
        let err = kv.txn(vec![], ops).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Refused { name, .. } if name == key),
            "{key}: {err}"
        );
        let err = kv.txn(vec![], vec![Op::Delete(key.into())]).await.unwrap_err();
        assert!(matches!(err, StoreError::Refused { .. }), "{key}: {err}");
    }
    assert_eq!(kv.list("").await.unwrap().1, before, "no revision was spent");
    assert_eq!(kv.get("issuer/x/b.json").await.unwrap(), None);
    kv.txn(vec![], vec![Op::put("issuer/x/c.json", "3")]).await.unwrap();
    kv.close();
    drop(kv);
    // Nothing refused reached the log: the store opens, with the writes that were made.
    let again = open(dir.path());
    assert_eq!(again.get("issuer/x/c.json").await.unwrap().unwrap().value, b"3");
    assert_eq!(again.get("issuer/x/b.json").await.unwrap(), None);
    assert!(std::fs::read(dir.path().join("lock")).is_ok_and(|held| held != b"x"));
}

#[tokio::test]
async fn after_a_panic_that_held_the_keys_every_call_is_refused_as_a_panic() {
    let kv = MemoryKv::new();
    kv.txn(vec![], vec![Op::put("a", "1")]).await.unwrap();
    let inner = kv.inner.clone();
    let _ = std::thread::spawn(move || {
        let _held = inner.lock().unwrap();
        panic!("a bug while changing the keys");
    })
    .join();
    let err = kv.get("a").await.unwrap_err();
    assert!(matches!(err, StoreError::Panicked { .. }), "{err}");
    assert!(err.to_string().contains("a panic (a bug in tbot)"), "{err}");
    let err = kv.txn(vec![], vec![Op::put("a", "2")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Panicked { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_transactions_in_line_together_decide_in_order_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(open(dir.path()));
    // Creates of one key race; every other write is its own key. Those decided while others
    // wait for the disk are decided against the waiting writes.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let kv = kv.clone();
            tokio::spawn(async move {
                let race = "issuer/x/tokens/t.json".to_owned();
                let won = kv
                    .txn(
                        vec![Condition::Absent(race.clone())],
                        vec![Op::put(&race, format!("{i}"))],
                    )
                    .await
                    .unwrap()
                    .0;
                kv.txn(vec![], vec![Op::put(format!("issuer/x/bots/b@{i}.json"), "{}")])
                    .await
                    .unwrap();
                won
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
    let (entries, revision) = kv.list("issuer/").await.unwrap();
    assert_eq!(entries.len(), 201);
    assert_eq!(revision, 201, "one revision per applied transaction");
    drop(kv);
    let kv = open(dir.path());
    assert_eq!(kv.list("issuer/").await.unwrap().0, {
        let mut again = entries.clone();
        for (n, e) in again.iter_mut().enumerate() {
            e.create_revision = n as i64 + 1;
            e.mod_revision = n as i64 + 1;
        }
        again
    });
}

#[tokio::test]
async fn a_directory_transaction_dropped_once_decided_is_still_written() {
    use futures_util::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let kv = open(dir.path());
    // Polled once (as `note_issued` does), then dropped.
    let _ = kv.txn(vec![], vec![Op::put("issuer/x/ca.json", "{}")]).now_or_never();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kv.get("issuer/x/ca.json").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(kv);
    assert_eq!(std::fs::read(dir.path().join("issuer/x/ca.json")).unwrap(), b"{}");
}

/// A hung disk under a busy store: transactions wait for it up to a bound, then are refused as
/// `Behind` (transient; nothing written) instead of holding ever more memory. Once the disk
/// answers, every transaction that was let in is written, and the store takes writes again.
#[tokio::test]
async fn a_store_behind_its_disk_refuses_writes_past_its_bound_and_keeps_every_one_it_took() {
    use crate::error::Explain;
    use futures_util::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let kv = open(dir.path());
    kv.lock().unwrap().journal.as_mut().unwrap().held = true;
    let value = vec![b'x'; 1 << 20];
    let mut taken = 0;
    let err = loop {
        // Decided and in line, then dropped, as by a caller that timed out and will try again.
        let ops = vec![Op::put(format!("issuer/x/{taken}.json"), value.clone())];
        match kv.txn(vec![], ops).now_or_never() {
            None => taken += 1,
            Some(Err(e)) => break e,
            Some(Ok(_)) => panic!("written while the disk is held"),
        }
        assert!(taken <= 100, "never refused");
    };
    assert_eq!(taken, journal::BEHIND_BYTES >> 20, "refused past the bound, not before");
    assert!(matches!(err, StoreError::Behind { transactions: 64, .. }), "{err}");
    assert!(err.is_transient(), "agents retry later");
    assert!(err.to_string().contains("is behind its disk"), "{err}");
    assert!(err.hint().contains("dmesg"), "{}", err.hint());
    // A small write too: the bound is on what waits, not on the write.
    let small = kv.txn(vec![], vec![Op::put("issuer/x/small.json", "1")]).now_or_never();
    assert!(matches!(small, Some(Err(StoreError::Behind { .. }))), "{small:?}");

    kv.lock().unwrap().journal.as_mut().unwrap().held = false;
    kv.wake.notify_all();
    let last = format!("issuer/x/{}.json", taken - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while kv.get(&last).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "what was let in is never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kv.txn(vec![], vec![Op::put("issuer/x/after.json", "2")]).await.unwrap();
    drop(kv);
    let again = open(dir.path());
    let (entries, _) = again.list("issuer/x/").await.unwrap();
    assert_eq!(entries.len(), taken + 1, "every write let in, and the one after");
    assert_eq!(
        again.get("issuer/x/small.json").await.unwrap(),
        None,
        "refused: not written"
    );
}

#[tokio::test]
async fn history_is_trimmed_at_revision_boundaries() {
    let kv = MemoryKv::new();
    // Revisions of two events each, past the history bound.
    for i in 0..(HISTORY / 2 + 10) {
        kv.txn(
            vec![],
            vec![Op::put(format!("a/{i}"), "x"), Op::put(format!("b/{i}"), "y")],
        )
        .await
        .unwrap();
    }
    let inner = kv.lock().unwrap();
    assert!(inner.history.len() <= HISTORY);
    let first = inner.history[0].revision();
    assert_eq!(first, inner.compacted);
    assert_eq!(
        inner.history.iter().filter(|e| e.revision() == first).count(),
        2,
        "the oldest revision kept is whole"
    );
}

/// Values the store no longer holds live on in the history only up to a bound in bytes: 200
/// rewrites of a 1 MiB key keep at most `HISTORY_BYTES` (they held 200 MiB before); a watch from
/// before the cut is told to list again, and one from after replays every revision it asks for.
#[tokio::test]
async fn history_holds_at_most_its_bound_in_bytes() {
    let kv = MemoryKv::new();
    let value = vec![b'x'; 1 << 20];
    for _ in 0..200 {
        kv.txn(vec![], vec![Op::put("log/big", value.clone())]).await.unwrap();
        kv.txn(vec![], vec![Op::put("log/small", "y")]).await.unwrap();
    }
    let (compacted, revision) = {
        let inner = kv.lock().unwrap();
        assert!(inner.history_bytes <= HISTORY_BYTES, "{} bytes", inner.history_bytes);
        assert_eq!(
            inner.history_bytes,
            inner.history.iter().map(Past::bytes).sum::<usize>()
        );
        assert!(inner.compacted > 1);
        assert_eq!(inner.history[0].revision(), inner.compacted);
        (inner.compacted, inner.revision)
    };
    let mut rx = kv.watch("log/", 1).await.unwrap();
    match rx.recv().await.unwrap() {
        Err(StoreError::Compacted { revision }) => assert_eq!(revision, compacted),
        other => panic!("a watch from before the cut: {:?}", other.map(|e| e.len())),
    }
    let mut rx = kv.watch("log/", compacted).await.unwrap();
    let mut seen = 0;
    while let Ok(item) = rx.try_recv() {
        seen += item.unwrap().len();
    }
    assert_eq!(seen as i64, revision - compacted + 1, "every revision since the cut");
    assert_eq!(
        kv.get("log/big").await.unwrap().unwrap().value,
        value,
        "the live value stays"
    );
}

#[tokio::test]
async fn a_watch_replays_more_history_than_its_live_buffer() {
    let kv = MemoryKv::new();
    for i in 0..3000 {
        kv.txn(vec![], vec![Op::put(format!("k/{i}"), "x")]).await.unwrap();
    }
    let mut rx = kv.watch("k/", 1).await.unwrap();
    let mut seen = 0;
    while let Ok(item) = rx.try_recv() {
        seen += item.unwrap().len();
    }
    assert_eq!(seen, 3000, "every revision of the history is replayed");
}

/// Closing waits for the writer thread, but not forever: a writer stuck on a hung disk is left
/// behind after the wait.
#[test]
fn joined_within_waits_for_a_thread_that_ends_and_gives_up_on_one_that_does_not() {
    let quick = std::thread::spawn(|| {});
    assert!(joined_within(quick, Duration::from_secs(10)));
    let (release, stuck) = std::sync::mpsc::channel::<()>();
    let hung = std::thread::spawn(move || {
        let _ = stuck.recv();
    });
    let started = std::time::Instant::now();
    assert!(!joined_within(hung, Duration::from_millis(100)));
    assert!(started.elapsed() >= Duration::from_millis(100));
    drop(release);
}
