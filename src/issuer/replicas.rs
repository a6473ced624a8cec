//! Issuer replicas as they record themselves in the shared store: who they are, where agents reach
//! them, when they last beat, whether they serve, and which version (canonical hash) of each
//! document they apply — so `tbotctl status` on any replica shows a half-finished rollout.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How often a replica rewrites its record; the record lives on a lease of three times that.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// One replica's record, at `issuer/<trust domain>/replicas/<name>.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The `issuer` document's `metadata.name`.
    pub name: String,
    /// The issuer API's address (`listen`, or the first `public_addrs`).
    pub address: String,
    /// `host:pid`, telling two processes that claim one name apart.
    pub process: String,
    /// RFC 3339.
    pub started: String,
    /// Unix seconds of the last heartbeat.
    pub heartbeat: i64,
    /// Serving: its documents loaded, its CA and keys opened.
    pub ready: bool,
    /// `kind/name` → canonical hash of every cluster-side document it applies (not its `issuer`
    /// document, which differs per replica by design).
    pub documents: BTreeMap<String, String>,
}

/// The store key of a replica's record.
pub fn record_key(dir: &str, name: &str) -> String {
    format!("{dir}/replicas/{name}.json")
}

/// A document on which the replicas differ: each replica's hash (`None`: it does not have it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub document: String,
    pub versions: Vec<(String, Option<String>)>,
}

/// Every document that is not the same on all replicas.
pub fn drift(replicas: &[ReplicaRecord]) -> Vec<Drift> {
    let documents: BTreeSet<&String> = replicas.iter().flat_map(|r| r.documents.keys()).collect();
    documents
        .into_iter()
        .filter_map(|doc| {
            let versions: Vec<(String, Option<String>)> = replicas
                .iter()
                .map(|r| (r.name.clone(), r.documents.get(doc).cloned()))
                .collect();
            let distinct: BTreeSet<&Option<String>> = versions.iter().map(|(_, v)| v).collect();
            (distinct.len() > 1).then(|| Drift {
                document: doc.clone(),
                versions,
            })
        })
        .collect()
}

/// Keeps this replica's record in the store: rewritten every [`HEARTBEAT`] on a lease of three
/// heartbeats (a killed replica's record goes by itself), removed at once on a clean stop.
/// `documents` gives the documents applied now.
pub async fn heartbeat(
    issuer: std::sync::Arc<super::LocalIssuer>,
    mut record: ReplicaRecord,
    documents: impl Fn() -> BTreeMap<String, String> + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::kv::Op;
    let kv = issuer.backing().kv.clone();
    let mut lease = 0i64;
    let mut failing = false;
    loop {
        let dir = format!("issuer/{}", issuer.policy().trust_domain.as_str());
        record.heartbeat = time::OffsetDateTime::now_utc().unix_timestamp();
        record.documents = documents();
        record.ready = true;
        let beat = async {
            if lease == 0 || kv.keep_alive(lease).await.is_err() {
                lease = kv.grant(HEARTBEAT * 3).await?;
            }
            let value = serde_json::to_vec(&record).expect("a replica record serializes");
            kv.txn(
                vec![],
                vec![Op::Put {
                    key: record_key(&dir, &record.name),
                    value,
                    lease,
                }],
            )
            .await
        };
        match beat.await {
            Ok(_) if failing => {
                tracing::info!(replica = %record.name, "the replica's heartbeat reaches the store again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, hint = e.hint(), "cannot record the replica's heartbeat in the store");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            _ = stop.changed() => {
                if lease != 0 {
                    let _ = kv.revoke(lease).await;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, docs: &[(&str, &str)]) -> ReplicaRecord {
        ReplicaRecord {
            name: name.into(),
            documents: docs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..ReplicaRecord::default()
        }
    }

    #[test]
    fn drift_lists_documents_that_differ_or_are_missing() {
        let replicas = [
            replica("a", &[("role/r", "1"), ("bot/b", "2"), ("token/t", "3")]),
            replica("b", &[("role/r", "1"), ("bot/b", "9"), ("token/t", "3")]),
            replica("c", &[("role/r", "1"), ("bot/b", "2")]),
        ];
        let drift = drift(&replicas);
        let documents: Vec<&str> = drift.iter().map(|d| d.document.as_str()).collect();
        assert_eq!(documents, ["bot/b", "token/t"]);
        assert_eq!(drift[1].versions[2], ("c".to_string(), None));
    }
}
