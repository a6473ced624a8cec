//! One reconcile, one pipeline: load → keep the last good version of broken files → hold back what
//! waits out a backoff → plan → execute → record failures → report. Every wake-up of the loop runs
//! exactly this.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::execute::Failure;
use super::{Daemon, agent_config, agent_ref};
use crate::agent::bot::jitter;
use crate::controller::plan::{Action, plan};
use crate::controller::retry::{Requeue, SPREAD};
use crate::manifest::{self, Changes, DesiredState, Loaded, render};
use crate::resource::ObjectRef;

/// The state to converge to: the loaded objects, with the last good version of every object from a
/// file that now fails to load.
pub(super) fn keep_last_good(loaded: &mut Loaded, last: &DesiredState) -> DesiredState {
    let broken: BTreeSet<&PathBuf> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| &d.location.path)
        .collect();
    let mut state = std::mem::take(&mut loaded.state);
    if broken.is_empty() {
        return state;
    }
    state.objects.retain(|_, o| !broken.contains(&o.location.path));
    for (r, o) in &last.objects {
        if broken.contains(&o.location.path) && !state.objects.contains_key(r) {
            state.objects.insert(r.clone(), o.clone());
        }
    }
    state
}

/// Where a reconcile spent its time, for the debug log.
struct Phases {
    last: std::time::Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            spent: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.spent.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, spent)) in self.spent.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {:.1} ms", spent.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

impl Daemon {
    /// Reloads the documents and converges. Returns when to retry objects that failed, if any.
    pub(super) async fn reconcile(&mut self, changes: &Changes) -> Option<tokio::time::Instant> {
        let started = std::time::Instant::now();
        let retry = self.reconcile_once(changes).await;
        let m = &self.telemetry.daemon;
        m.reconciles.inc();
        m.reconcile_seconds.inc_by(started.elapsed().as_secs_f64());
        retry
    }

    /// Loads the documents; `Err` carries when to try again (`None`: at the next event or resync).
    async fn load(&self, changes: &Changes) -> Result<Loaded, Option<tokio::time::Instant>> {
        let inputs = self.inputs.clone();
        let cache = self.load_cache.clone();
        let changes = changes.clone();
        let load = move || manifest::load_changed(&inputs, &mut cache.lock().expect("load cache poisoned"), &changes);
        let loaded = match tokio::task::spawn_blocking(load).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(diagnostic)) => {
                tracing::error!("{}", render::diagnostic(&diagnostic).trim_end());
                return Err(None);
            }
            Err(e) => {
                tracing::error!(error = %e, "the reload failed; it is tried again in 1 s");
                return Err(Some(tokio::time::Instant::now() + Duration::from_secs(1)));
            }
        };
        for d in loaded.diagnostics.iter().filter(|d| d.is_error()) {
            tracing::error!(
                "{}\n  the last good version of this file's objects stays in force",
                render::diagnostic(d).trim_end()
            );
        }
        Ok(loaded)
    }

    async fn reconcile_once(&mut self, changes: &Changes) -> Option<tokio::time::Instant> {
        let mut phases = Phases::new();
        let mut loaded = match self.load(changes).await {
            Ok(loaded) => loaded,
            Err(again) => return again.into_iter().chain(self.retry.next_due()).min(),
        };
        phases.mark(if loaded.patched { "load (patched)" } else { "load" });
        let applied = self.applied();
        let mut desired = keep_last_good(&mut loaded, &applied);
        // An object waiting out its backoff keeps its applied version in this run, unless its spec
        // changed: a spec change clears the backoff and runs at once.
        self.retry.forget_edited(&desired);
        let held: Vec<ObjectRef> = self.retry.held_back(tokio::time::Instant::now()).cloned().collect();
        for r in held {
            match applied.objects.get(&r) {
                Some(old) => desired.objects.insert(r, old.clone()),
                None => desired.objects.remove(&r),
            };
        }
        self.observe(&loaded, &desired);
        phases.mark("status");
        let plan = plan(&desired, Some(&applied));
        phases.mark("plan");
        // An agent that has not joined yet tries again, unless it was refused and waits for an edit.
        let to_join = self.agent.is_none() && agent_config(&desired).is_some() && !self.retry.is_refused(&agent_ref());
        if plan.is_empty() && !to_join {
            tracing::debug!("reloaded: nothing changed");
            self.report(&self.retry.waiting());
            return self.retry.next_due();
        }
        if plan.is_empty() {
            tracing::info!("the agent has not joined yet; trying again");
        } else {
            let (add, change, destroy) = plan.counts();
            tracing::info!(add, change, destroy, "documents changed; converging");
        }
        for step in &plan.steps {
            let causes: Vec<String> = step.causes.iter().map(|c| c.to_string()).collect();
            tracing::info!(causes = %causes.join(", "), "{}", step.action);
        }
        if let (Some(set), Some(config)) = (&self.log_level, agent_config(&desired)) {
            set(config.debug);
        }
        let failures = self.execute(&plan, &desired).await;
        phases.mark("execute");
        self.status.update(|s| {
            for step in &plan.steps {
                if let Action::RestartRequired { field } = &step.action {
                    for cause in &step.causes {
                        s.table.restart_required(cause, field);
                    }
                }
            }
        });
        let failed = self.record(&failures, &desired);
        let mut next = desired;
        for (r, requeue) in &failed {
            if matches!(requeue, Requeue::After(_)) {
                match applied.objects.get(r) {
                    Some(old) => next.objects.insert(r.clone(), old.clone()),
                    None => next.objects.remove(r),
                };
            }
        }
        self.set_applied(Arc::new(next));
        let waiting: BTreeSet<ObjectRef> = failed.into_keys().chain(self.retry.refused().cloned()).collect();
        self.report(&waiting);
        phases.mark("status");
        tracing::debug!(phases = %phases, "converged");
        self.retry.next_due()
    }

    /// Takes in what was loaded: the files that fail, their objects `Invalid`, the new generations
    /// `Reconciling`. Watchers see `Reconciling` before the work starts.
    fn observe(&mut self, loaded: &Loaded, desired: &DesiredState) {
        let files_failing = &self.telemetry.daemon.files_failing;
        self.status.update(|s| {
            s.table.files_failing(&loaded.diagnostics);
            files_failing.set(s.table.file_errors.len() as i64);
            for d in loaded.diagnostics.iter().filter(|d| d.is_error()) {
                s.table.invalid(
                    &d.location.path,
                    &format!("{}: {}; the last good version stays in force", d.location, d.message),
                );
            }
            s.table.observe(desired);
        });
    }

    /// Records failed steps: their conditions, and each object's requeue (a backoff for the
    /// transient ones, a wait for an edit for the terminal ones). Returns the failed objects.
    pub(super) fn record(
        &mut self,
        failures: &[Failure],
        desired: &DesiredState,
    ) -> std::collections::BTreeMap<ObjectRef, Requeue> {
        let failed: Vec<(ObjectRef, bool)> = failures
            .iter()
            .flat_map(|f| f.causes.iter().map(|r| (r.clone(), f.transient)))
            .collect();
        let requeues = self
            .retry
            .record(&failed, desired, tokio::time::Instant::now(), || jitter(SPREAD));
        self.status.update(|s| {
            for f in failures {
                let message = if f.transient {
                    format!("{} (retrying with backoff)", f.message)
                } else {
                    format!("{} (waiting for an edit)", f.message)
                };
                for cause in &f.causes {
                    s.table.stalled(cause, f.reason, &message);
                }
            }
        });
        requeues
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Input, load};
    use crate::resource::Kind;

    fn quickstart() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        dir
    }

    #[test]
    fn a_file_that_fails_to_load_keeps_its_last_good_objects_and_the_others_move_on() {
        let dir = quickstart();
        let mut first = load(&[Input::Dir(dir.path().to_owned())]).unwrap();
        let last = keep_last_good(&mut first, &DesiredState::default());
        let bot = ObjectRef::new(Kind::Bot, "quickstart");
        assert!(last.objects.contains_key(&bot));
        // bot.yaml breaks; the role file changes.
        std::fs::write(
            dir.path().join("bot.yaml"),
            "kind: bot\nversion: v1\nmetadata: {name: [\n",
        )
        .unwrap();
        let role = std::fs::read_to_string(dir.path().join("role.yaml")).unwrap();
        std::fs::write(dir.path().join("role.yaml"), format!("{role}\n# edited\n")).unwrap();
        let mut second = load(&[Input::Dir(dir.path().to_owned())]).unwrap();
        assert!(second.has_errors());
        let next = keep_last_good(&mut second, &last);
        assert_eq!(
            next.objects.get(&bot),
            last.objects.get(&bot),
            "the broken file's bot stays as it was"
        );
        let role = ObjectRef::new(Kind::Role, "quickstart-issuer");
        assert!(
            next.objects[&role].source.contains("# edited"),
            "a file that loads is taken as it is now"
        );
    }

    #[test]
    fn the_phases_of_a_reconcile_are_listed_in_order() {
        let mut phases = Phases::new();
        phases.mark("load");
        phases.mark("plan");
        let shown = phases.to_string();
        assert!(shown.starts_with("load ") && shown.contains(", plan "), "{shown}");
    }
}
