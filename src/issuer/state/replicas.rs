//! Issuer replicas as they record themselves in the shared store: who they are, where agents reach
//! them, when they last beat, whether they serve, and which version (canonical hash) of each
//! document they apply — so `tbotctl status` on any replica shows a half-finished rollout.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Explain;
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
    /// Another live process records itself under the same name (`host:pid at address`): two
    /// replicas were given one `metadata.name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub conflict: String,
    /// How many agents have a `Watch` stream open on it, by the id of the CA that signed the bot
    /// certificate each opened it with: a forced CA retire on any replica waits for them all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agents_by_ca: BTreeMap<u32, u64>,
    /// By key name (a CA's pin, a `kid`): how many of its agents hold something the key signed,
    /// and how many SVIDs, as they report it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<String, [u64; 2]>,
}

impl ReplicaRecord {
    /// The record of this process, replica `name` serving on `address`: its address is `address`,
    /// or this host's name and the port when `address` is a wildcard (`public_addrs` name the
    /// balancer).
    pub fn this_process(name: &str, address: std::net::SocketAddr) -> ReplicaRecord {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        ReplicaRecord {
            name: name.to_owned(),
            address: if address.ip().is_unspecified() {
                format!("{host}:{}", address.port())
            } else {
                address.to_string()
            },
            process: format!("{host}:{}", std::process::id()),
            started: crate::rfc3339(time::OffsetDateTime::now_utc()),
            ..ReplicaRecord::default()
        }
    }
}

/// The host part of a record's `process` (`host:pid`).
fn host_of(process: &str) -> &str {
    process.rsplit_once(':').map_or(process, |(host, _)| host)
}

/// Whether `found`, read where `mine` is about to be written, belongs to another live process:
/// written since our last beat (`last`, Unix seconds; 0 before the first) by another process — on
/// the first beat, another host's record that is still fresh (the same host's is this replica's
/// previous life, restarted).
fn other_process(mine: &ReplicaRecord, found: &ReplicaRecord, last: i64, now: i64) -> bool {
    if found.process == mine.process {
        return false;
    }
    let fresh = now - found.heartbeat < 3 * HEARTBEAT.as_secs() as i64;
    if last == 0 {
        fresh && host_of(&found.process) != host_of(&mine.process)
    } else {
        found.heartbeat >= last
    }
}

/// The store key of a replica's record.
pub fn record_key(dir: &str, name: &str) -> String {
    format!("{dir}/replicas/{name}.json")
}

/// The replica name a record key stands for.
pub fn name_of_record(dir: &str, key: &str) -> Option<String> {
    Some(
        key.strip_prefix(dir)?
            .strip_prefix("/replicas/")?
            .strip_suffix(".json")?
            .to_owned(),
    )
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
/// `documents` gives the documents applied now, `agents` its agents by their certificates' CA and
/// what they hold by signing key.
pub async fn heartbeat(
    issuer: std::sync::Arc<crate::issuer::LocalIssuer>,
    mut record: ReplicaRecord,
    documents: impl Fn() -> BTreeMap<String, String> + Send + 'static,
    agents: impl Fn() -> (BTreeMap<u32, u64>, BTreeMap<String, [u64; 2]>) + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::kv::Op;
    let kv = issuer.backing().kv.clone();
    let mut lease = 0i64;
    let mut failing = false;
    // When our last beat was written (Unix seconds; 0: none yet).
    let mut last = 0i64;
    loop {
        let dir = format!("issuer/{}", issuer.policy().trust_domain.as_str());
        record.heartbeat = time::OffsetDateTime::now_utc().unix_timestamp();
        record.documents = documents();
        (record.agents_by_ca, record.held) = agents();
        record.ready = true;
        let key = record_key(&dir, &record.name);
        // Someone else writing under our name: say so in the record (every replica's status shows
        // it) and in the log. The record as the store has it is in memory (the issuer's watch).
        if let Some(found) = issuer.replica(&record.name) {
            let conflict = if other_process(&record, &found, last, record.heartbeat) {
                format!("{} at {}", found.process, found.address)
            } else {
                String::new()
            };
            if !conflict.is_empty() && record.conflict.is_empty() {
                tracing::error!(replica = %record.name, other = %conflict,
                        "another process records itself as this replica: give each replica its own `metadata.name` in its `issuer` document");
            }
            if !conflict.is_empty() || found.process == record.process {
                record.conflict = conflict;
            }
        }
        let beat = async {
            if lease == 0 || kv.keep_alive(lease).await.is_err() {
                lease = kv.grant(HEARTBEAT * 3).await?;
            }
            let value = serde_json::to_vec(&record).expect("a replica record serializes");
            kv.txn(
                vec![],
                vec![Op::Put {
                    key: key.clone(),
                    value,
                    lease,
                }],
            )
            .await
        };
        let result = beat.await;
        if result.is_ok() {
            last = record.heartbeat;
        }
        match result {
            Ok(_) if failing => {
                tracing::info!(replica = %record.name, "the replica's heartbeat reaches the store again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, hint = %e.hint(), "cannot record the replica's heartbeat in the store");
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
    fn another_process_under_the_same_name_is_told_from_a_restart() {
        let record = |process: &str, heartbeat: i64| ReplicaRecord {
            name: "issuer-1".into(),
            process: process.into(),
            heartbeat,
            ..ReplicaRecord::default()
        };
        let me = record("host-a:200", 1000);
        // First beat: the same host's fresh record is this replica before a restart.
        assert!(!other_process(&me, &record("host-a:100", 995), 0, 1000));
        // First beat: another host's fresh record is another replica; a stale one is not.
        assert!(other_process(&me, &record("host-b:100", 995), 0, 1000));
        assert!(!other_process(&me, &record("host-b:100", 900), 0, 1000));
        // Later: anyone else who wrote since our last beat.
        assert!(other_process(&me, &record("host-a:300", 1003), 1000, 1005));
        assert!(!other_process(&me, &record("host-a:200", 1003), 1000, 1005));
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
