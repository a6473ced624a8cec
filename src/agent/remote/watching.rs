//! The `Watch` stream to the issuer: the bundle and the policy revision kept current, reconnecting
//! with full-jitter exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Explain;
use crate::issuer::wire::{self, proto};
use crate::issuer::{IssuerError, PolicyEvent};
use proto::workload_identity_service_client::WorkloadIdentityServiceClient;

use super::RemoteIssuer;

// Reconnect delays: full jitter, 1 s doubling to 60 s; after a connection that was up, the first
// retry waits a random 0–5 s so that agents do not all come back in the same instant.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const SPREAD_AFTER_DROP: Duration = Duration::from_secs(5);

fn random_below(max: Duration) -> Duration {
    max.mul_f64((crate::agent::bot::jitter(1.0) / 2.0).clamp(0.0, 1.0))
}

pub(super) async fn watch_loop(weak: std::sync::Weak<RemoteIssuer>) {
    let mut backoff = BACKOFF_MIN;
    let mut revision = 0u64;
    loop {
        let Some(issuer) = weak.upgrade() else { return };
        let mut epoch = issuer.epoch.subscribe();
        let started = *epoch.borrow_and_update();
        let was_up = match issuer.watch_once(&mut revision, &mut epoch).await {
            Ok(was_up) => was_up,
            Err(e) => {
                issuer.set_link(false, e.explain());
                false
            }
        };
        // A new identity (a renewal) or target: reconnect at once with it. Compared by value:
        // `watch_once` has already seen the change (`changed()` marks it seen), so `has_changed`
        // would say no, and every renewal would leave the agent without a stream for 0–5 s.
        if *epoch.borrow() != started {
            backoff = BACKOFF_MIN;
            continue;
        }
        let wait = if was_up {
            backoff = BACKOFF_MIN;
            random_below(SPREAD_AFTER_DROP)
        } else {
            let wait = random_below(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            wait
        };
        drop(issuer);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = epoch.changed() => backoff = BACKOFF_MIN,
        }
    }
}

impl RemoteIssuer {
    /// One `Watch` stream, until it ends or the identity/target changes. Returns whether it was up.
    pub(super) async fn watch_once(
        self: &Arc<Self>,
        revision: &mut u64,
        epoch: &mut watch::Receiver<u64>,
    ) -> Result<bool, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let request = proto::WatchRequest {
            policy_revision: *revision,
        };
        let mut stream = tokio::select! {
            r = client.watch(request) => r.map_err(|s| self.unreachable(&s))?.into_inner(),
            _ = epoch.changed() => return Ok(false),
        };
        let mut up = false;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = epoch.changed() => return Ok(up),
            };
            let update = match message {
                Ok(Some(update)) => update,
                Ok(None) => {
                    self.set_link(false, "the issuer ended the stream; reconnecting".into());
                    return Ok(up);
                }
                Err(status) => {
                    let e = self.unreachable(&status);
                    self.set_link(false, e.explain());
                    return Ok(up);
                }
            };
            if !up {
                up = true;
                tracing::info!(issuer = %self.settings().address, "connected to the issuer");
                self.set_link(true, String::new());
                self.resend_holdings();
            }
            if let Some(bundle) = update.bundle {
                self.set_bundles(wire::bundle_from_wire(bundle)?);
            }
            let first = *revision == 0;
            if update.policy_revision != *revision {
                *revision = update.policy_revision;
                if !first || update.all {
                    self.events.send_replace(Arc::new(PolicyEvent {
                        revision: update.policy_revision,
                        identities: update.identities.into_iter().collect(),
                        all: update.all,
                    }));
                }
            }
        }
    }
}
