//! Writing the controller's records (`controller/applied.json`, `controller/status.json`) off the
//! reconcile path: a reload hands over the latest applied state and moves on; one task writes the
//! newest version (several reloads in a row cost one write). Whether writes fail is published on
//! [`Persist::failures`]; the daemon shows it as the agent config's `StorageWritable` condition (the
//! status has one writer), and writes are tried again every 5 s until one succeeds. Serving never
//! depends on these files. A memory store keeps no records: they are for readers outside the
//! process (`tbotctl diff` without a daemon, an operator), and it has none; the daemon shows the
//! same through the admin API.

use std::sync::Arc;

use tokio::sync::watch;

use super::status::{SavedStatus, StatusReader};
use crate::error::Explain;
use crate::manifest::DesiredState;
use crate::store::Store;

/// How often a failing write is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Persist {
    tx: watch::Sender<Arc<DesiredState>>,
    failures: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// What was last written, so a reload that changed nothing writes nothing.
#[derive(Default)]
struct Written {
    applied: Option<Arc<DesiredState>>,
    entries: super::inventory::Entries,
    status: SavedStatus,
}

impl Persist {
    /// Starts the writer of `applied` and of the status `status` reads.
    pub fn spawn(store: Store, status: StatusReader, applied: Arc<DesiredState>) -> Persist {
        let (tx, mut rx) = watch::channel(applied);
        let (failures_tx, failures) = watch::channel(None);
        rx.mark_changed();
        let task = tokio::spawn(async move {
            let written = Arc::new(std::sync::Mutex::new(Written::default()));
            loop {
                // While writes fail, try again every RETRY even if nothing new comes.
                let next = if failures_tx.borrow().is_some() {
                    tokio::time::timeout(RETRY, rx.changed()).await.unwrap_or(Ok(()))
                } else {
                    rx.changed().await
                };
                if next.is_err() {
                    break;
                }
                let applied = rx.borrow_and_update().clone();
                let (store, status, written) = (store.clone(), status.clone(), written.clone());
                let job = move || {
                    write(
                        &store,
                        &status,
                        &applied,
                        &mut written.lock().expect("persist poisoned"),
                    )
                };
                let after = tokio::task::spawn_blocking(job).await.unwrap_or_else(|e| {
                    Err(format!(
                        "writing the controller's records failed: {e}; it is tried again in 5 s, and \
                         serving goes on from memory"
                    ))
                });
                let after = after.err();
                if *failures_tx.borrow() != after {
                    match &after {
                        Some(message) => tracing::error!("{message}"),
                        None => tracing::info!("the storage directory is writable again"),
                    }
                    failures_tx.send_replace(after);
                }
            }
        });
        Persist { tx, failures, task }
    }

    /// Why writes fail, while they do (`None` once one succeeds).
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.failures.clone()
    }

    /// Writes `applied` (and the status) soon.
    pub fn save(&self, applied: Arc<DesiredState>) {
        self.tx.send_replace(applied);
    }

    /// Writes the status soon (the applied state as last handed over).
    pub fn save_status(&self) {
        self.tx.send_modify(|_| {});
    }

    /// Writes what is pending, then ends the writer.
    pub async fn flush(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

fn write(
    store: &Store,
    status: &StatusReader,
    applied: &Arc<DesiredState>,
    written: &mut Written,
) -> Result<(), String> {
    if store.is_memory() {
        return Ok(());
    }
    if !written.applied.as_ref().is_some_and(|w| Arc::ptr_eq(w, applied)) {
        written.applied = None;
        super::inventory::save_with(store, applied, &mut written.entries).map_err(|e| {
            format!(
                "cannot save the applied state: {e}; {}; serving goes on from memory, and `tbotctl diff` \
                 without a daemon may be stale",
                e.hint()
            )
        })?;
        written.applied = Some(applied.clone());
    }
    // Only the text is made under the status lock; the write is not.
    let Some(text) = status.get().table.status_file(&mut written.status) else {
        return Ok(());
    };
    written
        .status
        .write(store, &text)
        .map_err(|e| format!("cannot save the status: {e}; {}", e.hint()))
}
