//! File watching: `notify` on each configured directory (never on single files: a watch on a file
//! dies when an editor replaces it). `Access` events are ignored (our own reads must not wake us);
//! any other event, the rescan flag and any watcher error all mean "reload everything".

use tokio::sync::mpsc;

use crate::manifest::Input;

/// Watches the inputs' directories; every relevant event sends `()`. Keep the watcher alive.
pub fn watch_inputs(inputs: &[Input], events: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if !matches!(&event, Ok(e) if matches!(e.kind, EventKind::Access(_)) && !e.need_rescan()) {
            let _ = events.send(());
        }
    })
    .map_err(
        |e| tracing::warn!(error = %e, "cannot watch the configuration; the periodic resync still applies changes"),
    )
    .ok()?;
    for input in inputs {
        let dir = match input {
            Input::Dir(dir) => dir.clone(),
            Input::File(file) => file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Into::into)
                .unwrap_or_else(|| ".".into()),
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch this directory; the periodic resync still applies changes");
        }
    }
    Some(watcher)
}
