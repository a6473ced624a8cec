//! Retry as a value: the one place that decides, for an object whose step failed, whether to back off
//! and run it again (transient: 1 s doubling to 5 min, ±20%) or to wait for an edit of its document
//! (terminal). An edit of the document clears either at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::manifest::DesiredState;
use crate::resource::ObjectRef;

/// The first delay after a transient failure.
pub const FIRST: Duration = Duration::from_secs(1);
/// The longest delay: doubling stops here.
pub const MAX: Duration = Duration::from_secs(300);
/// How far a delay is spread either way, so that objects failing together do not retry together.
pub const SPREAD: f64 = 0.2;

/// What to do about an object whose step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Run it again after this long (a transient failure).
    After(Duration),
    /// Run it again only once its document changes (a terminal failure).
    OnEdit,
}

/// One object's schedule.
#[derive(Debug, Clone)]
struct Backoff {
    delay: Duration,
    next: Instant,
    /// The canonical hash of the spec that failed: an edit clears the backoff.
    hash: String,
}

/// The objects waiting out a backoff or waiting for an edit.
#[derive(Debug, Default)]
pub struct Retry {
    backoff: BTreeMap<ObjectRef, Backoff>,
    /// Refused objects, with the hash of the spec refused.
    refused: BTreeMap<ObjectRef, String>,
}

impl Retry {
    /// Forgets every object whose document changed (or went) since it failed: an edit runs at once.
    pub fn forget_edited(&mut self, desired: &DesiredState) {
        let hash = |r: &ObjectRef| desired.objects.get(r).map(|o| &o.hash);
        self.backoff.retain(|r, b| hash(r) == Some(&b.hash));
        self.refused.retain(|r, h| hash(r) == Some(h));
    }

    /// Objects still waiting out their backoff at `now`: they keep their applied version this run.
    pub fn held_back(&self, now: Instant) -> impl Iterator<Item = &ObjectRef> {
        self.backoff.iter().filter(move |(_, b)| b.next > now).map(|(r, _)| r)
    }

    /// Whether `r` was refused and waits for an edit.
    pub fn is_refused(&self, r: &ObjectRef) -> bool {
        self.refused.contains_key(r)
    }

    /// The objects refused, waiting for an edit.
    pub fn refused(&self) -> impl Iterator<Item = &ObjectRef> {
        self.refused.keys()
    }

    /// Records the outcome of a run: `failed` lists each failed object with whether the failure is
    /// transient. Transient ones back off (doubling from their last delay); terminal ones wait for an
    /// edit; every object not named failed is forgotten by the backoff. `jitter` spreads a delay (a
    /// factor near 1; see [`SPREAD`]). Returns each failed object's requeue.
    pub fn record(
        &mut self,
        failed: &[(ObjectRef, bool)],
        desired: &DesiredState,
        now: Instant,
        jitter: impl Fn() -> f64,
    ) -> BTreeMap<ObjectRef, Requeue> {
        let hash = |r: &ObjectRef| desired.objects.get(r).map(|o| o.hash.clone());
        let mut out = BTreeMap::new();
        let transient: BTreeSet<&ObjectRef> = failed.iter().filter(|(_, t)| *t).map(|(r, _)| r).collect();
        for r in &transient {
            let delay = self.backoff.get(*r).map_or(FIRST, |b| (b.delay * 2).min(MAX));
            let backoff = Backoff {
                delay,
                next: now + delay.mul_f64(jitter()),
                hash: hash(r).unwrap_or_default(),
            };
            self.backoff.insert((*r).clone(), backoff);
            out.insert((*r).clone(), Requeue::After(delay));
        }
        self.backoff.retain(|r, _| transient.contains(r));
        for (r, _) in failed.iter().filter(|(r, t)| !t && !transient.contains(r)) {
            if let Some(h) = hash(r) {
                self.refused.insert(r.clone(), h);
            }
            out.insert(r.clone(), Requeue::OnEdit);
        }
        out
    }

    /// Every object waiting, for a backoff or for an edit.
    pub fn waiting(&self) -> BTreeSet<ObjectRef> {
        self.backoff.keys().chain(self.refused.keys()).cloned().collect()
    }

    /// When the earliest backed-off object is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.next).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Kind;

    /// Bots named `name`, each with the canonical hash given (a stand-in for its spec).
    fn state(objects: &[(&str, &str)]) -> DesiredState {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
        let loaded = crate::manifest::load(&[crate::manifest::Input::Dir(dir)]).unwrap();
        let template = loaded.state.objects[&bot("quickstart")].clone();
        let mut state = DesiredState::default();
        for (name, hash) in objects {
            let mut object = (*template).clone();
            object.hash = (*hash).to_owned();
            state.objects.insert(bot(name), std::sync::Arc::new(object));
        }
        state
    }

    fn bot(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::Bot, name)
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_backs_off_doubling_to_five_minutes_and_is_held_back_meanwhile() {
        let desired = state(&[("a", "1")]);
        let mut retry = Retry::default();
        let mut delays = Vec::new();
        for _ in 0..12 {
            let now = Instant::now();
            let requeue = retry.record(&[(bot("a"), true)], &desired, now, || 1.0);
            let Requeue::After(delay) = requeue[&bot("a")] else {
                panic!("{requeue:?}")
            };
            delays.push(delay.as_secs());
            assert_eq!(retry.next_due(), Some(now + delay));
            assert_eq!(retry.held_back(now).count(), 1, "held back until due");
            tokio::time::advance(delay).await;
            assert_eq!(retry.held_back(Instant::now()).count(), 0, "due once the delay passed");
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_spread_stays_within_twenty_percent() {
        let desired = state(&[("a", "1")]);
        for factor in [1.0 - SPREAD, 1.0 + SPREAD] {
            let mut retry = Retry::default();
            let now = Instant::now();
            retry.record(&[(bot("a"), true)], &desired, now, || factor);
            assert_eq!(retry.next_due(), Some(now + FIRST.mul_f64(factor)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_terminal_failure_waits_for_an_edit_and_an_edit_clears_both_kinds() {
        let desired = state(&[("a", "1"), ("b", "1")]);
        let mut retry = Retry::default();
        let requeue = retry.record(&[(bot("a"), false), (bot("b"), true)], &desired, Instant::now(), || 1.0);
        assert_eq!(requeue[&bot("a")], Requeue::OnEdit);
        assert!(retry.is_refused(&bot("a")));
        assert_eq!(retry.waiting().len(), 2);
        // Time alone does not retry a refusal.
        tokio::time::advance(Duration::from_secs(3600)).await;
        retry.forget_edited(&desired);
        assert!(retry.is_refused(&bot("a")));
        // An edit of each document clears it.
        retry.forget_edited(&state(&[("a", "2"), ("b", "2")]));
        assert!(retry.waiting().is_empty());
        assert_eq!(retry.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_that_succeeds_leaves_the_backoff_and_starts_again_from_one_second() {
        let desired = state(&[("a", "1")]);
        let mut retry = Retry::default();
        for _ in 0..3 {
            retry.record(&[(bot("a"), true)], &desired, Instant::now(), || 1.0);
        }
        retry.record(&[], &desired, Instant::now(), || 1.0);
        assert!(retry.waiting().is_empty());
        let requeue = retry.record(&[(bot("a"), true)], &desired, Instant::now(), || 1.0);
        assert_eq!(requeue[&bot("a")], Requeue::After(FIRST));
    }
}
