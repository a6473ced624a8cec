//! The `etcd` backend (etcd v3 API through the `etcd-client` crate): keys live under `prefix`;
//! conditions become `Txn` compares on `create_revision`/`mod_revision`; watches are prefix watches
//! from a start revision; leases are etcd leases. Every call has a deadline, so a cluster without
//! quorum answers with `StoreError::Unavailable` naming the endpoints instead of hanging.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{Condition, Entry, Event, Kv, Op, WatchItem};
use crate::store::StoreError;

/// How long one store call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A key as etcd returned it, without the `prefix` it lives under.
fn entry_of(prefix: &str, kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(kv.key())
            .strip_prefix(prefix)
            .unwrap_or_default()
            .to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// The pause before trying a call again after an election or a lost member.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Errors worth one more try: no leader yet, or the member the call went to is gone.
fn retriable(chain: &str) -> bool {
    [
        "leader changed",
        "no leader",
        "tcp connect error",
        "Connection refused",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|sign| chain.contains(sign))
}

fn no_answer() -> String {
    format!(
        "no answer in {} s (are a majority of its members up and reachable?)",
        CALL_TIMEOUT.as_secs()
    )
}

/// Where the etcd cluster is and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Every key goes under it, such as `/tbot`.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
}

impl EtcdSettings {
    /// The settings of an `issuer` document's `spec.storage` (for `type: etcd`).
    pub fn of(storage: &crate::resource::issuer::IssuerStorage) -> EtcdSettings {
        EtcdSettings {
            endpoints: storage.endpoints.clone(),
            prefix: storage
                .prefix
                .clone()
                .unwrap_or_else(|| crate::resource::issuer::IssuerStorage::DEFAULT_PREFIX.into()),
            tls: storage.tls.as_ref().map(|t| EtcdTls {
                ca_file: t.ca_file.clone(),
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            }),
        }
    }
}

/// Client TLS to etcd (PEM files).
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The etcd store.
pub struct EtcdKv {
    client: Client,
    prefix: String,
    describe: String,
}

/// Connects to the cluster (lazily: an unreachable cluster fails the first call, not this one).
pub async fn connect_etcd(settings: &EtcdSettings) -> Result<EtcdKv, StoreError> {
    let describe = format!("etcd {}", settings.endpoints.join(","));
    let unavailable = |reason: String| StoreError::Unavailable {
        store: describe.clone(),
        reason,
    };
    let mut options = ConnectOptions::new()
        .with_timeout(CALL_TIMEOUT)
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &settings.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))
        };
        let mut config = TlsOptions::new();
        if let Some(ca) = &tls.ca_file {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(config);
    }
    let client = Client::connect(&settings.endpoints, Some(options))
        .await
        .map_err(|e| unavailable(crate::error_chain(&e)))?;
    let prefix = format!("{}/", settings.prefix.trim_end_matches('/'));
    Ok(EtcdKv {
        client,
        describe: format!("{describe} (prefix {prefix})"),
        prefix,
    })
}

impl EtcdKv {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn unavailable(&self, e: etcd_client::Error) -> StoreError {
        let chain = crate::error_chain(&e);
        // A call that ran out of time is the usual sign of a cluster without quorum (or none up):
        // say that, not the transport's wording.
        let reason = if chain.contains("Timeout expired") || chain.contains("deadline") {
            no_answer()
        } else {
            chain
        };
        StoreError::Unavailable {
            store: self.describe.clone(),
            reason,
        }
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Entry {
        entry_of(&self.prefix, kv)
    }

    /// Runs `call` (on a fresh handle each time) until it answers or the deadline passes, trying
    /// again after the errors a leader election or a lost member gives: the request reached no
    /// leader, or its member is gone. Safe for the issuer's writes, which are conditional and
    /// recognise their own retries.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, call(self.client.clone())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e))
                    if retriable(&crate::error_chain(&e)) && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(self.unavailable(e)),
                Err(_) => {
                    return Err(StoreError::Unavailable {
                        store: self.describe.clone(),
                        reason: no_answer(),
                    });
                }
            }
        }
    }

    /// Runs a call with the deadline (a watch or keep-alive stream has none of its own).
    async fn timed<T>(&self, call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result.map_err(|e| self.unavailable(e)),
            Err(_) => Err(StoreError::Unavailable {
                store: self.describe.clone(),
                reason: no_answer(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Kv for EtcdKv {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = self.full(key);
        let response = self
            .retrying(|mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        Ok(response.kvs().first().map(|kv| self.entry(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let prefix = self.full(prefix);
        let response = self
            .retrying(|mut client| {
                let prefix = prefix.clone();
                async move { client.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((response.kvs().iter().map(|kv| self.entry(kv)).collect(), revision))
    }

    async fn txn(&self, conditions: Vec<Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        let compares: Vec<Compare> = conditions
            .into_iter()
            .map(|c| match c {
                Condition::Absent(key) => Compare::create_revision(self.full(&key), CompareOp::Equal, 0),
                Condition::Present(key) => Compare::create_revision(self.full(&key), CompareOp::NotEqual, 0),
                Condition::ModRevision(key, revision) => {
                    Compare::mod_revision(self.full(&key), CompareOp::Equal, revision)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    self.full(&key),
                    value,
                    (lease != 0).then(|| etcd_client::PutOptions::new().with_lease(lease)),
                ),
                Op::Delete(key) => TxnOp::delete(self.full(&key), None),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let response = self
            .retrying(|mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        Ok((response.succeeded(), response.header().map_or(0, |h| h.revision())))
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<mpsc::Receiver<WatchItem>, StoreError> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self.timed(client.watch(self.full(prefix), Some(options))).await?;
        let (tx, rx) = mpsc::channel(1024);
        let (strip, describe) = (self.prefix.clone(), self.describe.clone());
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = tx.closed() => return,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable {
                                store: describe.clone(),
                                reason: format!("the watch broke: {}", crate::error_chain(&e)),
                            }))
                            .await;
                        return;
                    }
                };
                if response.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            revision: response.compact_revision(),
                        }))
                        .await;
                    return;
                }
                if response.canceled() {
                    let _ = tx
                        .send(Err(StoreError::Unavailable {
                            store: describe.clone(),
                            reason: format!("the watch was canceled: {}", response.cancel_reason()),
                        }))
                        .await;
                    return;
                }
                // One message may carry several revisions: deliver one batch per revision.
                let events = response.events().iter().filter_map(|event| {
                    let entry = entry_of(&strip, event.kv()?);
                    Some(match event.event_type() {
                        EventType::Put => Event::Put(entry),
                        EventType::Delete => Event::Delete {
                            key: entry.key,
                            mod_revision: entry.mod_revision,
                        },
                    })
                });
                for batch in super::by_revision(events) {
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let seconds = ttl.as_secs().max(1) as i64;
        let response = self
            .retrying(|mut client| async move { client.lease_grant(seconds, None).await })
            .await?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let renewed = async {
            let (mut keeper, mut stream) = self.timed(client.lease_keep_alive(lease)).await?;
            self.timed(keeper.keep_alive()).await?;
            self.timed(stream.message()).await
        };
        match renewed.await {
            Ok(Some(response)) if response.ttl() > 0 => Ok(()),
            Ok(_) => Err(StoreError::LeaseExpired { lease }),
            Err(StoreError::Unavailable { reason, .. }) if reason.contains("lease not found") => {
                Err(StoreError::LeaseExpired { lease })
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        match self
            .retrying(|mut client| async move { client.lease_revoke(lease).await })
            .await
        {
            Err(StoreError::Unavailable { reason, .. }) if reason.contains("not found") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.retrying(|mut client| async move { client.compact(revision, None).await })
            .await
            .map(drop)
    }
}
