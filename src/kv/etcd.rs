//! The `etcd` backend (etcd's v3 gRPC API, `proto/etcd.proto`, through tonic): keys live under
//! `prefix`; conditions become `Txn` compares on `create_revision`/`mod_revision`; watches are prefix
//! watches from a start revision; leases are etcd leases. Every call has a deadline, so a cluster
//! without quorum answers with `StoreError::Unavailable` naming the endpoints instead of hanging.
//! Calls are spread over the endpoints, and one that reaches a member that is down or has no leader
//! is tried again until the deadline.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::{Condition, Entry, Event, Kv, Op, WatchItem};
use crate::store::StoreError;

/// The generated client of etcd's API.
#[allow(clippy::all, missing_docs)]
mod proto {
    tonic::include_proto!("etcdserverpb");
}

use proto::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::kv_client::KvClient;
use proto::lease_client::LeaseClient;
use proto::watch_client::WatchClient;

/// How long one store call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A key as etcd returned it, without the `prefix` it lives under.
fn entry_of(prefix: &str, kv: &proto::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(&kv.key)
            .strip_prefix(prefix)
            .unwrap_or_default()
            .to_owned(),
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

/// The end of the range of every key that starts with `prefix`: the prefix with its last byte
/// below 0xff incremented (and what follows it dropped); `\0` (every key) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The pause before trying a call again after an election or a lost member.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Errors worth one more try: no leader yet, or the member the call went to is gone (etcd and
/// the transport both say `UNAVAILABLE`).
fn retriable(status: &Status, chain: &str) -> bool {
    status.code() == Code::Unavailable
        || [
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
    channel: Channel,
    prefix: String,
    describe: String,
}

/// An endpoint as the `issuer` document names it: with its scheme, or `host:port` (then `https://`
/// when TLS is configured, else `http://`).
fn endpoint_url(endpoint: &str, tls: bool) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// Connects to the cluster (lazily: an unreachable cluster fails the first call, not this one).
pub async fn connect_etcd(settings: &EtcdSettings) -> Result<EtcdKv, StoreError> {
    let describe = format!("etcd {}", settings.endpoints.join(","));
    let unavailable = |reason: String| StoreError::Unavailable {
        store: describe.clone(),
        reason,
    };
    let tls = match &settings.tls {
        None => None,
        Some(tls) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))
            };
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca_file {
                config = config.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            Some(config)
        }
    };
    let mut endpoints = Vec::new();
    for endpoint in &settings.endpoints {
        let url = endpoint_url(endpoint, tls.is_some());
        let mut e = Endpoint::from_shared(url.clone())
            .map_err(|e| unavailable(format!("`{url}` is not an endpoint URL: {e}")))?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CALL_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if let Some(config) = &tls {
            e = e
                .tls_config(config.clone())
                .map_err(|e| unavailable(format!("TLS for `{url}`: {}", crate::error_chain(&e))))?;
        }
        endpoints.push(e);
    }
    if endpoints.is_empty() {
        return Err(unavailable("no endpoints".into()));
    }
    let channel = Channel::balance_list(endpoints.into_iter());
    let prefix = format!("{}/", settings.prefix.trim_end_matches('/'));
    Ok(EtcdKv {
        channel,
        describe: format!("{describe} (prefix {prefix})"),
        prefix,
    })
}

impl EtcdKv {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel.clone())
    }

    fn unavailable(&self, e: Status) -> StoreError {
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

    fn entry(&self, kv: &proto::KeyValue) -> Entry {
        entry_of(&self.prefix, kv)
    }

    /// Runs `call` until it answers or the deadline passes, trying again after the errors a leader
    /// election or a lost member gives: the request reached no leader, or its member is gone. Safe
    /// for the issuer's writes, which are conditional and recognise their own retries.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, call()).await {
                Ok(Ok(answer)) => return Ok(answer.into_inner()),
                Ok(Err(e))
                    if retriable(&e, &crate::error_chain(&e))
                        && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
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
    async fn timed<T>(&self, call: impl Future<Output = Result<T, Status>>) -> Result<T, StoreError> {
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
        let request = proto::RangeRequest {
            key: self.full(key).into_bytes(),
            ..Default::default()
        };
        let response = self
            .retrying(|| {
                let (mut client, request) = (self.kv(), request.clone());
                async move { client.range(request).await }
            })
            .await?;
        Ok(response.kvs.first().map(|kv| self.entry(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let key = self.full(prefix).into_bytes();
        let request = proto::RangeRequest {
            range_end: prefix_end(&key),
            key,
            ..Default::default()
        };
        let response = self
            .retrying(|| {
                let (mut client, request) = (self.kv(), request.clone());
                async move { client.range(request).await }
            })
            .await?;
        let revision = response.header.map_or(0, |h| h.revision);
        Ok((response.kvs.iter().map(|kv| self.entry(kv)).collect(), revision))
    }

    async fn txn(&self, conditions: Vec<Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        let compare = |key: String, result: CompareResult, target: CompareTarget, union: TargetUnion| proto::Compare {
            result: result as i32,
            target: target as i32,
            key: self.full(&key).into_bytes(),
            target_union: Some(union),
        };
        let compare: Vec<proto::Compare> = conditions
            .into_iter()
            .map(|c| match c {
                Condition::Absent(key) => compare(
                    key,
                    CompareResult::Equal,
                    CompareTarget::Create,
                    TargetUnion::CreateRevision(0),
                ),
                Condition::Present(key) => compare(
                    key,
                    CompareResult::NotEqual,
                    CompareTarget::Create,
                    TargetUnion::CreateRevision(0),
                ),
                Condition::ModRevision(key, revision) => compare(
                    key,
                    CompareResult::Equal,
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(revision),
                ),
            })
            .collect();
        let success: Vec<proto::RequestOp> = ops
            .into_iter()
            .map(|op| proto::RequestOp {
                request: Some(match op {
                    Op::Put { key, value, lease } => proto::request_op::Request::RequestPut(proto::PutRequest {
                        key: self.full(&key).into_bytes(),
                        value,
                        lease,
                    }),
                    Op::Delete(key) => proto::request_op::Request::RequestDeleteRange(proto::DeleteRangeRequest {
                        key: self.full(&key).into_bytes(),
                        range_end: Vec::new(),
                    }),
                }),
            })
            .collect();
        let request = proto::TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let response = self
            .retrying(|| {
                let (mut client, request) = (self.kv(), request.clone());
                async move { client.txn(request).await }
            })
            .await?;
        Ok((response.succeeded, response.header.map_or(0, |h| h.revision)))
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<mpsc::Receiver<WatchItem>, StoreError> {
        let key = self.full(prefix).into_bytes();
        let create = proto::WatchRequest {
            request_union: Some(proto::watch_request::RequestUnion::CreateRequest(
                proto::WatchCreateRequest {
                    range_end: prefix_end(&key),
                    key,
                    start_revision: from,
                    progress_notify: false,
                },
            )),
        };
        // The request side stays open for as long as the watch runs: etcd ends a watch stream
        // whose client closed its side.
        let (requests, outbound) = mpsc::channel(1);
        requests.try_send(create).expect("an empty channel takes one request");
        let mut client = WatchClient::new(self.channel.clone());
        let mut stream = self
            .timed(client.watch(ReceiverStream::new(outbound)))
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let (strip, describe) = (self.prefix.clone(), self.describe.clone());
        tokio::spawn(async move {
            let _requests = requests;
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
                if response.compact_revision > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            revision: response.compact_revision,
                        }))
                        .await;
                    return;
                }
                if response.canceled {
                    let _ = tx
                        .send(Err(StoreError::Unavailable {
                            store: describe.clone(),
                            reason: format!("the watch was canceled: {}", response.cancel_reason),
                        }))
                        .await;
                    return;
                }
                // One message may carry several revisions: deliver one batch per revision.
                let events = response.events.iter().filter_map(|event| {
                    let entry = entry_of(&strip, event.kv.as_ref()?);
                    Some(match event.r#type() {
                        proto::event::EventType::Put => Event::Put(entry),
                        proto::event::EventType::Delete => Event::Delete {
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
        let request = proto::LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        };
        let response = self
            .retrying(|| {
                let mut client = self.lease();
                async move { client.lease_grant(request).await }
            })
            .await?;
        if !response.error.is_empty() {
            return Err(StoreError::Unavailable {
                store: self.describe.clone(),
                reason: format!("no lease granted: {}", response.error),
            });
        }
        Ok(response.id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<(), StoreError> {
        let (requests, outbound) = mpsc::channel(1);
        requests
            .try_send(proto::LeaseKeepAliveRequest { id: lease })
            .expect("an empty channel takes one request");
        let renewed = async {
            let mut stream = self
                .timed(self.lease().lease_keep_alive(ReceiverStream::new(outbound)))
                .await?
                .into_inner();
            self.timed(stream.message()).await
        };
        let answer = renewed.await;
        drop(requests);
        match answer {
            Ok(Some(response)) if response.ttl > 0 => Ok(()),
            Ok(_) => Err(StoreError::LeaseExpired { lease }),
            Err(StoreError::Unavailable { reason, .. }) if reason.contains("lease not found") => {
                Err(StoreError::LeaseExpired { lease })
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let request = proto::LeaseRevokeRequest { id: lease };
        match self
            .retrying(|| {
                let mut client = self.lease();
                async move { client.lease_revoke(request).await }
            })
            .await
        {
            Err(StoreError::Unavailable { reason, .. }) if reason.contains("not found") => Ok(()),
            other => other.map(drop),
        }
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let request = proto::CompactionRequest {
            revision,
            physical: false,
        };
        self.retrying(|| {
            let mut client = self.kv();
            async move { client.compact(request).await }
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_the_last_key_under_it() {
        assert_eq!(prefix_end(b"/tbot/"), b"/tbot0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_without_a_scheme_take_the_tls_setting() {
        assert_eq!(endpoint_url("10.0.0.1:2379", false), "http://10.0.0.1:2379");
        assert_eq!(endpoint_url("10.0.0.1:2379", true), "https://10.0.0.1:2379");
        assert_eq!(endpoint_url("https://etcd:2379", false), "https://etcd:2379");
    }
}
