//! The loop: every wake-up is a reconcile. A file event (debounced) reloads the files it names;
//! SIGHUP, `tbotctl apply`, the periodic resync and a retry falling due reload everything; each
//! then converges; a poke (something shown by
//! status changed outside the loop) re-reports. The issuer's key lifecycle (rotation and pruning) is
//! its own scheduler's, not the loop's. SIGTERM and SIGINT stop it.

use std::process::ExitCode;

use super::boot::Booted;
use super::{DEBOUNCE, RESYNC};
use crate::agent::bot::jitter;
use crate::controller::notify;
use crate::manifest::Changes;

pub(super) async fn run(booted: Booted) -> ExitCode {
    let Booted {
        mut daemon,
        mut signals,
        mut events,
        watcher: _watcher,
        mut reloads,
        stop,
        mut retry_at,
        oneshot,
    } = booted;
    if oneshot {
        let config = super::agent_config(&daemon.applied()).cloned();
        let code = super::outputs::oneshot(&mut daemon, config.as_ref()).await;
        let _ = stop.send(true);
        daemon.shutdown().await;
        return code;
    }
    let mut storage = daemon.persist.failures();
    let mut resync = tokio::time::Instant::now() + RESYNC.mul_f64(jitter(0.2));
    loop {
        let retry_sleep = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            Some(first) = events.recv() => {
                let m = &daemon.telemetry.daemon.watch_events;
                m.inc();
                tokio::time::sleep(DEBOUNCE).await;
                let mut changes = first;
                while let Ok(more) = events.try_recv() {
                    m.inc();
                    changes.add(more);
                }
                // Only what the watcher named is read again; everything else stays as loaded.
                notify::reloading();
                retry_at = daemon.reconcile(&changes).await;
                notify::ready();
                continue;
            }
            _ = signals.hup.recv() => tracing::info!("SIGHUP: reloading"),
            _ = daemon.poke.notified() => {
                daemon.report(&daemon.retry.waiting());
                continue;
            }
            Ok(()) = storage.changed() => {
                daemon.report(&daemon.retry.waiting());
                continue;
            }
            Some(done) = reloads.recv() => {
                retry_at = daemon.reconcile(&Changes::Everything).await;
                let _ = done.send(());
                continue;
            }
            _ = tokio::time::sleep_until(resync) => {}
            _ = retry_sleep => {}
        }
        resync = tokio::time::Instant::now() + RESYNC.mul_f64(jitter(0.2));
        notify::reloading();
        retry_at = daemon.reconcile(&Changes::Everything).await;
        notify::ready();
    }
    notify::stopping();
    let _ = stop.send(true);
    tracing::info!("stopping: no new connections; open streams end");
    daemon.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
