//! Key lifecycle, with one scheduler: signing bot certificates and noting what the active CA
//! signed, the rotation steps of the CA and the JWT key (scheduled or by hand), and pruning retired
//! CAs and expired bot instances. The schedule wakes at the next due step, when the keys or the
//! settings change, and at least every minute, when it also prunes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use time::OffsetDateTime;

use crate::issuer::bots::{self, BotClaims, bot_record_key};
use crate::issuer::keys::ca::Authority;
use crate::issuer::keys::rotation::{ByHand, KeyStatus, Refused, Step};
use crate::issuer::{BotCertificate, IssuerError};
use crate::kv::{Condition, Op};

use super::{CONFLICT_RETRIES, INSTANCE_RETENTION, Inner, LocalIssuer, State, now};

use crate::error::Explain;

/// Whether two decisions are the same step: the same kind (a later `activate_at` is the same
/// preparation), and the same key for an activation (also one made by a taint).
fn same_step(a: Step, b: Step) -> bool {
    match (a, b) {
        (Step::Activate { id: x }, Step::Activate { id: y }) => x == y,
        (Step::Taint { activate: x }, Step::Taint { activate: y }) => x == y,
        _ => std::mem::discriminant(&a) == std::mem::discriminant(&b),
    }
}

/// How long a rotation by hand retries a store that does not answer.
const BY_HAND_RETRY: Duration = Duration::from_secs(15);

/// The longest the schedule sleeps without looking again (a clock jump, a missed wake-up).
pub(super) const SCHEDULE_RECHECK: Duration = Duration::from_secs(60);

/// Steps the CA's and the JWT key's rotations when they are due: wakes at the next due time (or
/// when the keys or the settings change), takes the step (one replica wins each by a conditional
/// write; the others take its keys from the store), and looks again. A failed step is retried.
/// Every [`SCHEDULE_RECHECK`] it also prunes retired CAs and expired bot instances.
pub(super) async fn schedule(inner: Weak<Inner>) {
    let mut failures = 0u32;
    // The first look prunes at once (what retired while the issuer was stopped goes at start).
    let mut pruned: Option<tokio::time::Instant> = None;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        if pruned.is_none_or(|at| at.elapsed() >= SCHEDULE_RECHECK) {
            pruned = Some(tokio::time::Instant::now());
            if let Err(e) = strong.prune().await {
                tracing::warn!(error = %e, hint = %e.hint(), "cannot prune retired CAs and expired bot instances");
            }
        }
        let (ca_next, jwt_next) = {
            let state = strong.lock();
            (
                state.authority.due(&state.policy.ca, now()),
                state.jwt.due(&state.policy.jwt, now()),
            )
        };
        let mut wait = SCHEDULE_RECHECK;
        for (jwt, (step, next)) in [(false, ca_next), (true, jwt_next)] {
            if step.is_some() {
                let taken = strong
                    .step(jwt, |state| {
                        Ok(if jwt {
                            state.jwt.due(&state.policy.jwt, now()).0
                        } else {
                            state.authority.due(&state.policy.ca, now()).0
                        })
                    })
                    .await;
                match taken {
                    Ok(_) => {
                        failures = 0;
                        wait = Duration::ZERO;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, hint = %e.hint(), key = if jwt { "jwt" } else { "ca" }, "a rotation step failed; retrying");
                        wait = wait.min(Duration::from_secs(1 << failures.min(5)));
                    }
                }
            } else if let Some(at) = next {
                let until = Duration::try_from(OffsetDateTime::from_unix_timestamp(at).unwrap_or(now()) - now())
                    .unwrap_or(Duration::ZERO);
                // A second late at most: the due time is in whole seconds.
                wait = wait.min(until + Duration::from_millis(50));
            }
        }
        if wait.is_zero() {
            continue;
        }
        // Held while waiting: the issuer's drop aborts this task.
        let notified = strong.reschedule.notified();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = notified => {}
        }
    }
}
impl Inner {
    /// Signs a bot certificate with the CA in memory, noting its expiry.
    pub(super) fn sign_bot(
        self: &Arc<Self>,
        claims: &BotClaims,
        public_key: &[u8],
        ttl: Duration,
    ) -> Result<BotCertificate, IssuerError> {
        let authority = self.lock().authority.clone();
        let minted = bots::sign_bot_certificate(&authority, claims, public_key, ttl, now())?;
        let cert = minted.made;
        // The new agent's first calls present it: they need not verify the signature just made,
        // unless the CA stopped being trusted meanwhile.
        let signer = authority.active();
        let verified = bots::verified_at_signing(claims, public_key, cert.not_after, signer.id());
        let mut state = self.lock();
        if state.authority.trusts(signer) {
            state.remember_verified(&cert.der, verified);
        }
        drop(state);
        self.record(crate::issuer::state::issued::Issued {
            kind: crate::issuer::state::issued::IssuedKind::BotCertificate,
            serial: minted.serial,
            spiffe_id: String::new(),
            bot: cert.bot.clone(),
            instance: cert.instance.clone(),
            identity: String::new(),
            attributes: Default::default(),
            audience: Vec::new(),
            issued_at: now(),
            not_after: cert.not_after,
        });
        self.note_issued(cert.not_after);
        Ok(cert)
    }

    /// Records the expiry of something the active CA signed (see [`Authority::note_issued`]). When a
    /// write is due (one at a time): a store in this process decides it at once, as part of the call
    /// (memory answers at once; a `directory` store puts it in line for its log, and the rest of the
    /// save finishes in the background); a shared one in the background, so that issuance never
    /// waits for (or fails with) etcd.
    pub(super) fn note_issued(self: &Arc<Self>, not_after: OffsetDateTime) {
        let due = self.lock().authority.note_issued(not_after);
        if !due || self.saving.swap(true, Ordering::SeqCst) {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        let weak = Arc::downgrade(self);
        let mut save = Box::pin(async move {
            let Some(inner) = weak.upgrade() else { return };
            match inner.save_authority().await {
                // A store behind its disk says so itself, at most every 10 s: not once per issuance.
                Ok(()) | Err(IssuerError::Store(crate::store::StoreError::Behind { .. })) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the CA's issued-until in the store; retrying at the next issuance")
                }
            }
            inner.saving.store(false, Ordering::SeqCst);
        });
        if self.backing.local {
            use futures_util::FutureExt;
            if (&mut save).now_or_never().is_some() {
                return;
            }
        }
        match runtime {
            Some(runtime) => drop(runtime.spawn(save)),
            // Driven by hand, without a runtime: what is in line is written; the rest waits for
            // the next issuance.
            None => self.saving.store(false, Ordering::SeqCst),
        }
    }

    /// Writes the in-memory `ca.json` (its `issued_until`), merging with another replica's newer one.
    pub(super) async fn save_authority(&self) -> Result<(), IssuerError> {
        let mut copy = self.lock().authority.clone();
        for _ in 0..CONFLICT_RETRIES {
            if copy.save(&self.backing, Vec::new()).await? {
                // Memory takes the saved revision, keeping any note made since the copy was taken.
                let mut state = self.lock();
                if copy.revision() > state.authority.revision() && state.authority.same_cas(&copy) {
                    let mut mine = state.authority.clone();
                    mine.merge_from(copy);
                    state.authority = mine;
                }
                return Ok(());
            }
            let td = copy.trust_domain().clone();
            let Some(fresh) = Authority::load(&self.backing, &td).await? else {
                return Ok(());
            };
            if !fresh.same_cas(&copy) {
                // A rotation elsewhere: the watch brings it; the next note saves on top of it.
                return Ok(());
            }
            copy.merge_from(fresh);
        }
        Err(IssuerError::Unavailable(
            "ca.json keeps changing under this replica".into(),
        ))
    }

    /// Takes one rotation step of the CA (`jwt`: of the JWT key) if it is still what the keys in
    /// memory call for (`None`: the schedule's own due step; `Some`: a step by hand, checked by
    /// `check` against the keys as they are when written). Conditional on the store's revision;
    /// when another replica wrote first, memory takes its keys and the step is decided again.
    pub(super) async fn step(
        &self,
        jwt: bool,
        decide: impl Fn(&State) -> Result<Option<Step>, Refused>,
    ) -> Result<Option<Step>, IssuerError> {
        for _ in 0..CONFLICT_RETRIES {
            let (step, settings) = {
                let state = self.lock();
                let step = decide(&state).map_err(|e| IssuerError::Invalid(e.to_string()))?;
                (step, state.policy.clone())
            };
            let Some(step) = step else { return Ok(None) };
            let written = if jwt {
                let current = self.lock().jwt.clone();
                let (mut next, ops) = current.stepped(&self.backing, step, &settings.jwt, now())?;
                let written = next.save(&self.backing, ops).await?;
                if written {
                    self.lock().jwt = next;
                }
                written
            } else {
                let current = self.lock().authority.clone();
                let (mut next, ops) = current.stepped(&self.backing, step, &settings.ca, now())?;
                let written = next.save(&self.backing, ops).await?;
                if written {
                    let mut state = self.lock();
                    state.authority = next;
                    state.verified.clear();
                }
                written
            };
            if written {
                tracing::info!(key = if jwt { "jwt" } else { "ca" }, ?step, "rotation step taken");
                let mut state = self.lock();
                self.publish(&mut state);
                drop(state);
                self.reschedule.notify_one();
                return Ok(Some(step));
            }
            if jwt {
                self.reload_jwt().await;
            } else {
                self.reload_authority().await;
            }
        }
        Err(IssuerError::Unavailable(
            "the keys keep changing under this replica; retry".into(),
        ))
    }

    /// Drops CAs whose overlap has ended (publishing the bundle when it changed) and forgets bot
    /// instances that expired a day ago.
    pub(super) async fn prune(&self) -> Result<(), IssuerError> {
        let backing = &self.backing;
        for _ in 0..CONFLICT_RETRIES {
            let mut copy = self.lock().authority.clone();
            if !copy.prune(now()) {
                break;
            }
            if copy.save(backing, Vec::new()).await? {
                let mut state = self.lock();
                state.authority = copy;
                state.verified.clear();
                self.publish(&mut state);
                break;
            }
            self.reload_authority().await;
        }
        let horizon = (now() - INSTANCE_RETENTION).unix_timestamp();
        let (dir, expired): (String, Vec<(String, i64)>) = {
            let state = self.lock();
            let expired = state
                .bots
                .iter()
                .filter(|(_, (r, _))| r.locked.is_none() && r.info.as_ref().is_some_and(|i| i.not_after <= horizon))
                .map(|(k, (_, rev))| (k.clone(), *rev))
                .collect();
            (state.dir(), expired)
        };
        for (key, revision) in expired {
            let file = bot_record_key(&dir, &key);
            let (deleted, _) = backing
                .kv
                .txn(
                    vec![Condition::ModRevision(file.clone(), revision)],
                    vec![Op::Delete(file)],
                )
                .await?;
            if deleted {
                self.lock().bots.remove(&key);
            }
        }
        Ok(())
    }
}

impl LocalIssuer {
    /// The bundle sequence the bundle endpoint serves: moves whenever the CAs or JWT keys change,
    /// on any replica (the store's revisions only grow).
    pub fn bundle_sequence(&self) -> u64 {
        let state = self.lock();
        (state.authority.revision().max(0) + state.jwt.revision().max(0)) as u64
    }

    /// A rotation by hand (`tbotctl rotate`) of the CA or (`jwt`) the JWT key: prepares a successor
    /// that activates after `grace` (refused while one is prepared, unless forced, which activates
    /// it now; forced with nothing prepared withdraws the replaced keys), or taints or revokes the
    /// replaced keys (see [`ByHand`]).
    /// A shared store that does not answer for a moment (an etcd leader election after a member
    /// loss) is retried for up to [`BY_HAND_RETRY`]: the operator's command waits instead of failing.
    ///
    /// The step is decided once, on the keys as they are at the call. When another writer (the
    /// schedule, another replica) moves the keys first, the retry takes the same step or none: a
    /// `--force` that meant "activate the prepared key" never becomes "retire the old keys early".
    /// A step another writer already took (the same key activated) counts as done; any other
    /// change refuses, asking to look again.
    pub async fn rotate_by_hand(&self, jwt: bool, asked: ByHand) -> Result<Step, IssuerError> {
        let deadline = tokio::time::Instant::now() + BY_HAND_RETRY;
        let first: std::sync::Mutex<Option<Step>> = std::sync::Mutex::new(None);
        let decide = |state: &State| -> Result<Option<Step>, Refused> {
            let (step, active) = if jwt {
                (state.jwt.by_hand(asked, now()), state.jwt.active_id())
            } else {
                (state.authority.by_hand(asked, now()), state.authority.active_id())
            };
            let mut first = first.lock().expect("step poisoned");
            let Some(decided) = *first else {
                let step = step?;
                *first = Some(step);
                return Ok(Some(step));
            };
            match step {
                Ok(step) if same_step(decided, step) => Ok(Some(step)),
                _ if decided == (Step::Activate { id: active }) => Ok(None),
                _ => Err(Refused(format!(
                    "the keys changed while this ran (another writer, or this command's earlier try whose answer \
                     was lost), so `{decided:?}` was not taken again: look at `tbotctl status` before asking again"
                ))),
            }
        };
        let step = loop {
            match self.inner.step(jwt, decide).await {
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "the store does not answer; retrying the rotation by hand");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => break other?,
            }
        };
        let decided = *first.lock().expect("step poisoned");
        Ok(step.or(decided).expect("a rotation by hand always decides a step"))
    }

    /// Takes the CAs and JWT keys as the store has them now: a step by hand on this replica decides
    /// on what another replica did a moment ago (its watch event may not have arrived yet).
    pub async fn refresh_keys(&self) {
        self.inner.reload_authority().await;
        self.inner.reload_jwt().await;
    }

    /// Every CA's and JWT key's phase and dates.
    pub fn key_statuses(&self) -> Vec<KeyStatus> {
        let state = self.lock();
        let mut out = state.authority.statuses();
        out.extend(state.jwt.statuses());
        out
    }

    /// Prepares a successor CA with the policy's CA settings (the `cluster` document's `ca` was
    /// edited), unless the active CA or a prepared one already has them: it is published in every
    /// bundle now and signs after `SETTINGS_GRACE`, the same path as `tbotctl rotate ca`. Every
    /// replica applies the edit; only the first to write prepares (the others see its CA through
    /// the store). Returns whether this call prepared one.
    pub async fn rotate_ca_for_settings(&self) -> Result<bool, IssuerError> {
        self.inner.reload_authority().await;
        let step = self
            .inner
            .step(false, |state| Ok(state.authority.for_settings(&state.policy.ca, now())))
            .await?;
        Ok(step.is_some())
    }

    /// Drops CAs whose overlap has ended (publishing the bundle when it changed) and forgets bot
    /// instances that expired a day ago.
    pub async fn prune(&self) -> Result<(), IssuerError> {
        self.inner.prune().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::issuer::LocalIssuer;
    use crate::issuer::bots::{BotRecord, InstanceInfo, bot_record_key};
    use crate::issuer::state::backing::json;
    use crate::kv::Op;
    use crate::store::Store;
    use crate::testing::examples::{EXAMPLE_DOCUMENTS, policy_from_text};

    /// Waits (on paused time) until `done` holds, looking every 10 ms for at most 10 s.
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn the_key_schedule_also_prunes_bot_instances_expired_a_day_ago() {
        let issuer = LocalIssuer::open(Store::memory(), policy_from_text(EXAMPLE_DOCUMENTS))
            .await
            .unwrap();
        let two_days_ago = (time::OffsetDateTime::now_utc() - time::Duration::days(2)).unix_timestamp();
        let record = |bot: &str, not_after| BotRecord {
            generation: 1,
            info: Some(InstanceInfo {
                bot: bot.into(),
                join_method: "token".into(),
                not_after,
                ..InstanceInfo::default()
            }),
            ..BotRecord::default()
        };
        let dir = issuer.lock().dir();
        let far = two_days_ago + 10 * 86_400;
        let writes = vec![
            Op::put(bot_record_key(&dir, "b/expired"), json(&record("b", two_days_ago))),
            Op::put(bot_record_key(&dir, "b/current"), json(&record("b", far))),
        ];
        issuer.inner.backing.kv.txn(vec![], writes).await.unwrap();
        let keys = || -> Vec<String> { issuer.instances(None).into_iter().map(|(k, _)| k).collect() };
        // Nobody here calls `prune`: the schedule does (it wakes at least every minute).
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(
            eventually(|| keys() == ["b/current"]).await,
            "only the expired instance goes from memory: {:?}",
            keys()
        );
        let kv = &issuer.inner.backing.kv;
        assert!(
            kv.get(&bot_record_key(&dir, "b/expired")).await.unwrap().is_none(),
            "and from the store"
        );
        assert!(kv.get(&bot_record_key(&dir, "b/current")).await.unwrap().is_some());
    }
}
