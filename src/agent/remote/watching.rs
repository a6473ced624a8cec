//! The `Watch` stream to the issuer: the bundle and the policy revision kept current, reconnecting
//! on a steady period with a random phase (see [`Retry`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Explain;
use crate::issuer::wire::{self, proto};
use crate::issuer::{IssuerError, PolicyEvent};
use proto::workload_identity_service_client::WorkloadIdentityServiceClient;

use super::RemoteIssuer;

/// When to try the issuer again while the `Watch` stream is down.
///
/// The first try waits a random part of [`PERIOD`], and each next one the period (±10%): every agent
/// keeps its own random phase, so when a restarted issuer comes back the fleet arrives spread evenly
/// over one period (about a fifth of the agents in any second) and every agent is back within one
/// period of it, for any outage up to [`STEADY_FOR`]. Exponential backoff, full jitter or decorrelated jitter
/// would front-load the return (each agent's next try is more likely soon than late) and stretch
/// the tail. An outage longer than [`STEADY_FOR`] is a down issuer, not a restart: the period then
/// doubles up to [`PERIOD_MAX`], so a fleet does not knock on a dead host at full rate for hours.
#[derive(Debug)]
pub(super) struct Retry {
    since: Option<tokio::time::Instant>,
    period: Duration,
}

pub(super) const PERIOD: Duration = Duration::from_secs(5);
pub(super) const STEADY_FOR: Duration = Duration::from_secs(60);
pub(super) const PERIOD_MAX: Duration = Duration::from_secs(60);

impl Retry {
    pub(super) fn new() -> Retry {
        Retry {
            since: None,
            period: PERIOD,
        }
    }

    /// A new identity or target: the next loss starts afresh.
    pub(super) fn reset(&mut self) {
        *self = Retry::new();
    }

    /// A stream that was up for `up_for` ended. One that held for a [`PERIOD`] was a recovery: the
    /// next loss starts afresh. A shorter one (an issuer that answers and drops again, over and
    /// over) continues the outage, so its retries slow down as a down issuer's do instead of
    /// starting over at a random part of the period every time.
    pub(super) fn ended(&mut self, up_for: Duration) {
        if up_for >= PERIOD {
            self.reset();
        }
    }

    /// How long to wait before the next try, `unit` in [0, 1) being a fresh random draw.
    pub(super) fn next(&mut self, now: tokio::time::Instant, unit: f64) -> Duration {
        let Some(since) = self.since else {
            self.since = Some(now);
            return self.period.mul_f64(unit);
        };
        if now.duration_since(since) >= STEADY_FOR {
            self.period = (self.period * 2).min(PERIOD_MAX);
        }
        self.period.mul_f64(0.9 + 0.2 * unit)
    }
}

/// A uniform draw in [0, 1).
fn unit() -> f64 {
    (crate::agent::bot::jitter(1.0) / 2.0).clamp(0.0, 1.0 - f64::EPSILON)
}

pub(super) async fn watch_loop(weak: std::sync::Weak<RemoteIssuer>) {
    let mut retry = Retry::new();
    let mut revision = 0u64;
    loop {
        let Some(issuer) = weak.upgrade() else { return };
        let mut epoch = issuer.epoch.subscribe();
        let started = *epoch.borrow_and_update();
        let up_for = match issuer.watch_once(&mut revision, &mut epoch).await {
            Ok(up_since) => up_since.map_or(Duration::ZERO, |at| at.elapsed()),
            Err(e) => {
                issuer.set_link(false, e.explain());
                Duration::ZERO
            }
        };
        // A new identity (a renewal) or target: reconnect at once with it. Compared by value:
        // `watch_once` has already seen the change (`changed()` marks it seen), so `has_changed`
        // would say no, and every renewal would leave the agent without a stream for 0–5 s.
        if *epoch.borrow() != started {
            retry.reset();
            continue;
        }
        retry.ended(up_for);
        let wait = retry.next(tokio::time::Instant::now(), unit());
        drop(issuer);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = epoch.changed() => retry.reset(),
        }
    }
}

impl RemoteIssuer {
    /// One `Watch` stream, until it ends or the identity/target changes. Returns when it came up
    /// (its first message), if it did.
    pub(super) async fn watch_once(
        self: &Arc<Self>,
        revision: &mut u64,
        epoch: &mut watch::Receiver<u64>,
    ) -> Result<Option<tokio::time::Instant>, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let request = proto::WatchRequest {
            policy_revision: *revision,
        };
        let mut stream = tokio::select! {
            r = client.watch(request) => r.map_err(|s| self.unreachable(&s))?.into_inner(),
            _ = epoch.changed() => return Ok(None),
        };
        let mut up = None;
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
            if up.is_none() {
                up = Some(tokio::time::Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_keep_a_random_phase_on_a_steady_period_then_slow_down() {
        let start = tokio::time::Instant::now();
        let mut retry = Retry::new();
        assert_eq!(
            retry.next(start, 0.5),
            PERIOD / 2,
            "the first try: a random part of the period"
        );
        let mut at = start + PERIOD / 2;
        for _ in 0..10 {
            let wait = retry.next(at, 0.5);
            assert_eq!(wait, PERIOD, "then the period itself (±10%)");
            at += wait;
        }
        assert!(retry.next(at, 0.0) >= PERIOD.mul_f64(0.9));
        assert!(retry.next(at, 0.999) <= PERIOD.mul_f64(1.1));
        // A minute down: the period doubles up to its cap.
        let later = start + STEADY_FOR;
        let waits: Vec<Duration> = (0..5).map(|_| retry.next(later, 0.5)).collect();
        assert_eq!(waits[0], PERIOD * 2);
        assert_eq!(waits[4], PERIOD_MAX);
        retry.reset();
        assert_eq!(retry.next(later, 0.2), PERIOD.mul_f64(0.2), "a reconnect starts afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_drops_at_once_again_and_again_slows_down_like_an_outage() {
        let start = tokio::time::Instant::now();
        let mut retry = Retry::new();
        let mut at = start;
        let mut waits = Vec::new();
        // Each try gets a stream that is up for a second and drops.
        for _ in 0..30 {
            let wait = retry.next(at, 0.5);
            waits.push(wait);
            at += wait + Duration::from_secs(1);
            retry.ended(Duration::from_secs(1));
        }
        assert!(
            waits[1..].iter().all(|w| *w >= PERIOD.mul_f64(0.9)),
            "no try after the first is a random part of the period: {waits:?}"
        );
        assert_eq!(
            *waits.last().unwrap(),
            PERIOD_MAX,
            "a minute of it slows down: {waits:?}"
        );
        retry.ended(PERIOD - Duration::from_millis(1));
        assert_eq!(retry.next(at, 0.5), PERIOD_MAX, "just short of a period is no recovery");
        // A stream that held for a period was a recovery.
        retry.ended(PERIOD);
        assert_eq!(retry.next(at, 0.2), PERIOD.mul_f64(0.2));
    }

    #[test]
    fn a_fleet_that_lost_its_issuer_comes_back_spread_over_one_period() {
        // 10,000 agents lose the issuer at 0 and it is back at 5.3 s: each agent's first try after
        // that is when it reconnects. Deterministic draws stand in for the random ones.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut draw = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let start = tokio::time::Instant::now();
        let back = Duration::from_millis(5300);
        let mut per_second = [0usize; 16];
        for _ in 0..10_000 {
            let mut retry = Retry::new();
            let mut t = Duration::ZERO;
            while t < back {
                t += retry.next(start + t, draw());
            }
            per_second[((t - back).as_secs_f64()) as usize] += 1;
        }
        let busiest = *per_second.iter().max().unwrap();
        assert!(busiest <= 2_300, "at most about a fifth in any second: {per_second:?}");
        let within = per_second[..6].iter().sum::<usize>();
        assert_eq!(
            within, 10_000,
            "all back within a period and its jitter: {per_second:?}"
        );
    }
}
