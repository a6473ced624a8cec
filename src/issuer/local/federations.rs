//! Federation supervision: one task per `spiffe_federation` document, started, restarted or
//! stopped to match the policy; each publishes the foreign bundle it keeps.

use std::sync::Arc;

use crate::kv::Op;

use super::{Inner, LocalIssuer};

impl Inner {
    /// Sets (or, `None`, withdraws) a foreign trust domain's bundle, publishing it when it changed.
    pub(super) fn set_federated(&self, trust_domain: &str, bundle: Option<Arc<crate::issuer::TrustBundle>>) {
        let mut state = self.lock();
        let changed = match bundle {
            Some(b) => state.federated.insert(trust_domain.to_owned(), b.clone()).as_deref() != Some(&*b),
            None => state.federated.remove(trust_domain).is_some(),
        };
        if changed {
            self.publish(&mut state);
        }
    }
}

impl LocalIssuer {
    /// Starts, restarts or stops the federation tasks to match the policy's `spiffe_federation`
    /// documents; a removed domain's bundle is withdrawn from every workload at once.
    pub(super) fn sync_federations(&self) {
        let (wanted, own, dir) = {
            let state = self.lock();
            (
                state.policy.federations.clone(),
                state.policy.trust_domain.clone(),
                state.dir(),
            )
        };
        let mut running = self.federations.lock().expect("federations poisoned");
        let gone: Vec<String> = running
            .iter()
            .filter(|(td, r)| wanted.get(*td) != Some(&r.spec))
            .map(|(td, _)| td.clone())
            .collect();
        for td in gone {
            running.remove(&td);
            if !wanted.contains_key(&td) {
                self.inner.set_federated(&td, None);
                let backing = self.inner.backing.clone();
                let key = crate::issuer::federation::kept_key(&dir, &td);
                tokio::spawn(async move {
                    let _ = backing.kv.txn(vec![], vec![Op::Delete(key)]).await;
                });
                tracing::info!(trust_domain = %td, "federation removed; its bundle is withdrawn");
            }
        }
        for (td, spec) in wanted {
            if running.contains_key(&td) {
                continue;
            }
            if td == own.as_str() {
                tracing::warn!(trust_domain = %td, "a spiffe_federation names this issuer's own trust domain; ignored");
                continue;
            }
            let inner = Arc::downgrade(&self.inner);
            let name = td.clone();
            let publish: crate::issuer::federation::Publish = Arc::new(move |bundle| {
                if let Some(inner) = inner.upgrade() {
                    inner.set_federated(&name, bundle);
                }
            });
            // An edited source starts from the bundle in force (the old task's, still published).
            let known = self.lock().federated.get(&td).cloned();
            let start = crate::issuer::federation::Start {
                trust_domain: td.clone(),
                spec,
                known,
            };
            let started = crate::issuer::federation::start(start, self.inner.backing.clone(), dir.clone(), publish);
            running.insert(td, started);
        }
    }

    /// What each federation last did.
    pub fn federations(&self) -> Vec<crate::issuer::federation::FederationState> {
        self.federations
            .lock()
            .expect("federations poisoned")
            .values()
            .map(|r| r.state.lock().expect("federation state poisoned").clone())
            .collect()
    }
}
