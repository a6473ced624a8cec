//! Writing the controller's records (`controller/applied.json`, `controller/status.json`) off the
//! reconcile path: a reload hands over the latest applied state and moves on; one task writes the
//! newest version (several reloads in a row cost one write). A write that fails is shown as the
//! agent config's `StorageWritable` condition until a write succeeds again (tried every 5 s);
//! serving never depends on these files.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::status::StatusTable;
use crate::manifest::DesiredState;
use crate::store::Store;

/// How often a failing write is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Persist {
    tx: watch::Sender<Arc<DesiredState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Persist {
    /// Starts the writer; `on_change` runs when writes start failing (with the reason) or succeed
    /// again (with `None`), to show it in the status, which is then written again.
    pub fn spawn(
        store: Store,
        status: Arc<RwLock<StatusTable>>,
        applied: Arc<DesiredState>,
        on_change: impl Fn(Option<&str>) + Send + 'static,
    ) -> Persist {
        let (tx, mut rx) = watch::channel(applied);
        rx.mark_changed();
        let task = tokio::spawn(async move {
            let mut written: Option<Arc<DesiredState>> = None;
            // Why the last write failed, while it did.
            let mut failure: Option<String> = None;
            loop {
                // While writes fail, try again every RETRY even if nothing new comes.
                let next = if failure.is_some() {
                    tokio::time::timeout(RETRY, rx.changed()).await.unwrap_or(Ok(()))
                } else {
                    rx.changed().await
                };
                if next.is_err() {
                    break;
                }
                let applied = rx.borrow_and_update().clone();
                let fresh = !written.as_ref().is_some_and(|w| Arc::ptr_eq(w, &applied));
                let (store, status) = (store.clone(), status.clone());
                let job = move || write(&store, &status, fresh.then_some(&*applied)).map(|()| applied);
                let result = tokio::task::spawn_blocking(job).await.unwrap_or_else(|e| {
                    Err(format!(
                        "writing the controller's records failed: {e}; it is tried again in 5 s, and \
                             serving goes on from memory"
                    ))
                });
                let after = match result {
                    Ok(applied) => {
                        written = Some(applied);
                        None
                    }
                    Err(message) => {
                        written = None;
                        Some(message)
                    }
                };
                if failure != after {
                    match &after {
                        Some(message) => tracing::error!("{message}"),
                        None => tracing::info!("the storage directory is writable again"),
                    }
                    on_change(after.as_deref());
                    failure = after;
                    // Write again, so the file shows the condition's change too.
                    rx.mark_changed();
                }
            }
        });
        Persist { tx, task }
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

fn write(store: &Store, status: &RwLock<StatusTable>, applied: Option<&DesiredState>) -> Result<(), String> {
    if let Some(applied) = applied {
        super::inventory::save(store, applied).map_err(|e| {
            format!(
                "cannot save the applied state: {e}; {}; serving goes on from memory, and `tbotctl diff` \
                 without a daemon may be stale",
                e.hint()
            )
        })?;
    }
    let Some(snapshot) = status.write().expect("status poisoned").unsaved() else {
        return Ok(());
    };
    StatusTable::save_snapshot(store, &snapshot).inspect_err(|_| {
        status.write().expect("status poisoned").forget_saved();
    })
}
