//! What an open stream follows besides its own data: the caller it serves, resolved again when the
//! documents or the service's selector or lifetime change, and the service's stop, all forwarded
//! into one channel per service ([`Turns`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use super::denial::status;
use super::listener::Attested;
use super::server::{ServiceConfig, WorkloadApi};
use crate::agent::Agent;
use crate::error::Explain;
use crate::issuer::Resolved;

/// An open stream resolves its caller again when the documents change (the agent's policy
/// generation moves) or the service's selector or lifetime does, and ends when the service stops
/// (`stop` becomes `true` or its sender goes). The three are forwarded into this one value, so an
/// open stream waits on one channel for them instead of three: every stream registers and drops a
/// waiter on each channel it waits on, each time it waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Turns {
    /// Moves on every change of the policy or of the service's config.
    resolve: u64,
    stopped: bool,
}

/// The channel a service's streams follow, and the task that forwards into it.
pub(super) fn start_turns(
    policy: watch::Receiver<u64>,
    config: watch::Receiver<ServiceConfig>,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<Turns> {
    let (turns_tx, turns) = watch::channel(Turns {
        resolve: 0,
        stopped: *stop.borrow(),
    });
    tokio::spawn(forward_turns(policy, config, stop, turns_tx));
    turns
}

/// Forwards into `turns` until the service stops or no stream can be opened any more.
async fn forward_turns(
    mut policy: watch::Receiver<u64>,
    mut config: watch::Receiver<ServiceConfig>,
    mut stop: watch::Receiver<bool>,
    turns: watch::Sender<Turns>,
) {
    let resolve = |turns: &watch::Sender<Turns>| turns.send_modify(|t| t.resolve += 1);
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            Ok(()) = policy.changed() => resolve(&turns),
            Ok(()) = config.changed() => resolve(&turns),
            changed = stop.changed() => if changed.is_err() { break },
            // Every `WorkloadApi` (and so every stream) is gone.
            () = turns.closed() => return,
        }
    }
    turns.send_modify(|t| t.stopped = true);
}

/// The identities the service's current selector gives a caller, and their lifetime.
pub(super) async fn resolve_for(
    agent: &Agent,
    config: &watch::Receiver<ServiceConfig>,
    workload: &Attested,
) -> Result<(Vec<Resolved>, Duration), Status> {
    let ServiceConfig { selector, ttl } = config.borrow().clone();
    let resolved = agent.resolve(&selector, &workload.attributes).await.map_err(|e| {
        if e.is_transient() {
            status(e)
        } else {
            let denied = status(e);
            Status::permission_denied(format!(
                "{}; the caller was attested as: {}",
                denied.message(),
                super::denial::attested_summary(workload)
            ))
        }
    })?;
    if resolved.is_empty() {
        return Err(Status::permission_denied(format!(
            "no workload identity of this service matches the caller; check the service's selector and the identities' rules (`tbotctl get workload_identity`); the caller was attested as: {}",
            super::denial::attested_summary(workload)
        )));
    }
    Ok((resolved, ttl))
}

/// A caller as an open stream follows it: who it is, and what makes the stream resolve it again (an
/// edit of the documents, the service's selector or lifetime) or end (the daemon stopping).
pub(super) struct Follow {
    pub(super) agent: Arc<Agent>,
    config: watch::Receiver<ServiceConfig>,
    pub(super) workload: Arc<Attested>,
    turns: watch::Receiver<Turns>,
}

/// Why [`Follow::wake`] returned.
pub(super) enum Woke<T> {
    /// The stream's own data changed.
    Data(T),
    /// The caller must be resolved again.
    Resolve,
    /// The daemon is stopping.
    Stop,
}

impl Follow {
    /// Starts following: changes from now on count.
    pub(super) fn new(api: &WorkloadApi, workload: Arc<Attested>) -> Follow {
        let mut turns = api.turns.clone();
        turns.mark_unchanged();
        Follow {
            agent: api.agent.clone(),
            config: api.config.clone(),
            workload,
            turns,
        }
    }

    pub(super) async fn resolve(&self) -> Result<(Vec<Resolved>, Duration), Status> {
        resolve_for(&self.agent, &self.config, &self.workload).await
    }

    /// Waits for `data`, a reason to resolve the caller again, or the daemon's stop.
    pub(super) async fn wake<T>(&mut self, data: impl std::future::Future<Output = Option<T>>) -> Woke<T> {
        // A stream opened as the service stopped: no change of `turns` is left to wait for.
        if self.turns.borrow().stopped {
            return Woke::Stop;
        }
        tokio::select! {
            Some(d) = data => Woke::Data(d),
            changed = self.turns.changed() => match changed {
                Ok(()) if !self.turns.borrow().stopped => Woke::Resolve,
                _ => Woke::Stop,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::IdentitySelector;

    fn config(ttl: u64) -> ServiceConfig {
        ServiceConfig {
            selector: IdentitySelector::Name("svc".into()),
            ttl: Duration::from_secs(ttl),
        }
    }

    /// The next change of `turns`, within 5 s.
    async fn next(turns: &mut watch::Receiver<Turns>) -> Turns {
        let changed = tokio::time::timeout(Duration::from_secs(5), turns.changed());
        changed
            .await
            .expect("turns did not move within 5 s")
            .expect("turns closed");
        *turns.borrow_and_update()
    }

    /// A policy change and a config change each make streams resolve again; stopping ends them.
    #[tokio::test]
    async fn turns_move_on_policy_and_config_and_stop_on_stop() {
        let (policy_tx, policy) = watch::channel(0u64);
        let (config_tx, config_rx) = watch::channel(config(60));
        let (stop_tx, stop) = watch::channel(false);
        let (turns_tx, mut turns) = watch::channel(Turns::default());
        let forwarder = tokio::spawn(forward_turns(policy, config_rx, stop, turns_tx));

        policy_tx.send(1).unwrap();
        assert_eq!(
            next(&mut turns).await,
            Turns {
                resolve: 1,
                stopped: false
            }
        );

        config_tx.send(config(120)).unwrap();
        assert_eq!(
            next(&mut turns).await,
            Turns {
                resolve: 2,
                stopped: false
            }
        );

        stop_tx.send(true).unwrap();
        assert_eq!(
            next(&mut turns).await,
            Turns {
                resolve: 2,
                stopped: true
            }
        );
        forwarder.await.unwrap();
        assert!(turns.changed().await.is_err(), "the forwarder is gone once stopped");
    }

    /// The service's stop sender going away (its owner dropped) stops the streams too, as the
    /// stop itself does.
    #[tokio::test]
    async fn a_dropped_stop_sender_or_a_stop_before_start_stops_the_streams() {
        let (_policy_tx, policy) = watch::channel(0u64);
        let (_config_tx, config_rx) = watch::channel(config(60));
        let (stop_tx, stop) = watch::channel(false);
        let (turns_tx, mut turns) = watch::channel(Turns::default());
        let forwarder = tokio::spawn(forward_turns(policy.clone(), config_rx.clone(), stop, turns_tx));
        drop(stop_tx);
        assert!(next(&mut turns).await.stopped);
        forwarder.await.unwrap();

        let (_stop_tx, stop) = watch::channel(true);
        let (turns_tx, turns) = watch::channel(Turns::default());
        forward_turns(policy, config_rx, stop, turns_tx).await;
        assert!(turns.borrow().stopped);
    }
}
