//! File watching: `notify` on each configured directory (never on single files: a watch on a file
//! dies when an editor replaces it). `Access` events are ignored (our own reads must not wake us);
//! every other event says which paths changed, and the rescan flag, an event without paths and any
//! watcher error all mean "reload everything" (see [`Changes`]).

use tokio::sync::mpsc;

use crate::manifest::{Changes, Input};

/// Watches the inputs' directories; every relevant event sends what it changed. Keep the watcher
/// alive.
pub fn watch_inputs(inputs: &[Input], events: mpsc::UnboundedSender<Changes>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let changes = match event {
            Ok(e) if matches!(e.kind, EventKind::Access(_)) && !e.need_rescan() => return,
            Ok(e) if e.need_rescan() || e.paths.is_empty() => Changes::Everything,
            Ok(e) => Changes::Paths(e.paths.into_iter().collect()),
            Err(_) => Changes::Everything,
        };
        let _ = events.send(changes);
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
