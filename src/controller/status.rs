//! Status: per object `generation` (moves when the canonical hash does), `observedGeneration` (the
//! generation last converged), and typed conditions with reason, message and a transition time that
//! moves only on a flip; the files that fail to load; and what the host runs (CA pins, the issuer
//! link, services, outputs). One value with one writer ([`StatusWriter`], owned by the daemon) and
//! cheap readers ([`StatusReader`]: the admin API, `/readyz`, the records in the storage directory),
//! so every reader sees the same thing. Never kept in the watched directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::manifest::DesiredState;
use crate::resource::ObjectRef;

mod saved;
pub use saved::SavedStatus;

pub const FILE: &str = "controller/status.json";

/// A condition's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionType {
    /// The object runs what its document asks for.
    Ready,
    /// A new generation is being converged.
    Reconciling,
    /// The last attempt failed; it is retried or waits for an edit (the message says which).
    Stalled,
    /// The object's file fails to load; its last good version stays in force.
    Invalid,
    /// A field changed that takes effect only at the next start.
    RestartRequired,
    /// On a bot (or the agent config): how and when it joined.
    Joined,
    /// On the agent config: whether the controller's records can be written.
    StorageWritable,
    /// On the agent config: one file output's state.
    Output(String),
}

impl ConditionType {
    pub fn name(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ConditionType::Ready => "Ready".into(),
            ConditionType::Reconciling => "Reconciling".into(),
            ConditionType::Stalled => "Stalled".into(),
            ConditionType::Invalid => "Invalid".into(),
            ConditionType::RestartRequired => "RestartRequired".into(),
            ConditionType::Joined => "Joined".into(),
            ConditionType::StorageWritable => "StorageWritable".into(),
            ConditionType::Output(name) => format!("Output/{name}").into(),
        }
    }
}

/// Why a condition is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Converged,
    SpecChanged,
    LoadFailed,
    Loaded,
    FieldNeedsRestart,
    /// The issuer refused or could not take the new documents.
    IssuerFailed,
    RotationFailed,
    JoinFailed,
    RejoinFailed,
    ListenFailed,
    OutputFailed,
    RenewalFailed,
    IssuerUnreachable,
    /// The issuer refuses the agent's bot certificate.
    BotRefused,
    Joined,
    Rejoined,
    WriteFailed,
    Written,
    /// An output was removed; its files stay.
    Removed,
    /// An output's last issuance or write failed.
    Failing,
    /// An output's `on_update` hook failed.
    HookFailed,
    /// An output has not written yet.
    Pending,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Converged => "Converged",
            Reason::SpecChanged => "SpecChanged",
            Reason::LoadFailed => "LoadFailed",
            Reason::Loaded => "Loaded",
            Reason::FieldNeedsRestart => "FieldNeedsRestart",
            Reason::IssuerFailed => "IssuerFailed",
            Reason::RotationFailed => "RotationFailed",
            Reason::JoinFailed => "JoinFailed",
            Reason::RejoinFailed => "RejoinFailed",
            Reason::ListenFailed => "ListenFailed",
            Reason::OutputFailed => "OutputFailed",
            Reason::RenewalFailed => "RenewalFailed",
            Reason::IssuerUnreachable => "IssuerUnreachable",
            Reason::BotRefused => "BotRefused",
            Reason::Joined => "Joined",
            Reason::Rejoined => "Rejoined",
            Reason::WriteFailed => "WriteFailed",
            Reason::Written => "Written",
            Reason::Removed => "Removed",
            Reason::Failing => "Failing",
            Reason::HookFailed => "HookFailed",
            Reason::Pending => "Pending",
        }
    }
}

/// A condition as shown and saved (`type`, `status`, `reason` as text: `controller/status.json`
/// and the admin API keep their shape).
#[derive(Debug, Clone, PartialEq, Hash, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// An object's status. `controller/status.json` holds each object's generation and conditions;
/// its text and applied document are `controller/applied.json`'s (they are shown through the admin
/// API, not saved twice).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    pub path: String,
    pub hash: String,
    pub generation: u64,
    pub observed_generation: u64,
    pub conditions: Vec<Condition>,
    /// The object as last taken in: its text and document, shared with the desired state (not
    /// copied: 10,000 objects' texts are held once).
    #[serde(skip)]
    pub object: Option<Arc<crate::manifest::Object>>,
}

impl ObjectStatus {
    fn new(r: &ObjectRef) -> ObjectStatus {
        ObjectStatus {
            kind: r.kind.as_str().to_owned(),
            name: r.name.clone(),
            path: String::new(),
            hash: String::new(),
            generation: 0,
            observed_generation: 0,
            conditions: Vec::new(),
            object: None,
        }
    }

    /// The document's text as written, once taken in.
    pub fn source(&self) -> &str {
        self.object.as_ref().map_or("", |o| o.source.as_str())
    }

    /// The document, as JSON, once taken in.
    pub fn document_json(&self) -> String {
        self.object
            .as_ref()
            .map(|o| serde_json::to_string(&o.document).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The condition of `kind`, if set.
    pub fn condition(&self, kind: &ConditionType) -> Option<&Condition> {
        let kind = kind.name();
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Whether the condition of `kind` is set and true.
    pub fn holds(&self, kind: &ConditionType) -> bool {
        self.condition(kind).is_some_and(|c| c.status)
    }

    pub fn is_ready(&self) -> bool {
        self.observed_generation == self.generation && self.holds(&ConditionType::Ready)
    }

    /// Sets a condition; its transition time moves only when its status flips.
    fn set(&mut self, kind: &ConditionType, status: bool, reason: Reason, message: &str) {
        let (kind, reason) = (kind.name(), reason.as_str());
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) if c.status == status && c.reason == reason && c.message == message => {}
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now();
                }
                c.status = status;
                c.reason = reason.to_owned();
                c.message = message.to_owned();
            }
            None => self.conditions.push(Condition {
                kind: kind.into_owned(),
                status,
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: now(),
            }),
        }
    }
}

fn now() -> String {
    crate::rfc3339(OffsetDateTime::now_utc())
}

/// A file of the watched directory that fails to load, with its first error. Listed until the
/// file is fixed or removed, new files included (they have no object to carry `Invalid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    /// `file:line:column` (or the file alone when the problem is with the whole file).
    pub location: String,
    pub message: String,
    /// How many errors the file has in all.
    pub errors: usize,
}

/// Every object's status, and the files that fail to load.
#[derive(Debug, Clone, Default)]
pub struct StatusTable {
    pub objects: BTreeMap<ObjectRef, ObjectStatus>,
    /// The files that fail to load now, by path.
    pub file_errors: Vec<FileError>,
}

impl StatusTable {
    /// Takes in what the documents now ask for: new objects start at generation 1, changed ones move
    /// on and are `Reconciling`, deleted ones go.
    pub fn observe(&mut self, desired: &DesiredState) {
        // One ordered walk of both maps (both are sorted by object): a reload of 10,000 objects
        // after one edit looks each up once and clones no name; only what changed is rebuilt.
        let (mut added, mut gone) = (Vec::new(), Vec::new());
        let mut mine = self.objects.iter_mut().peekable();
        for (r, o) in &desired.objects {
            while let Some((k, _)) = mine.next_if(|(k, _)| *k < r) {
                gone.push(k.clone());
            }
            match mine.next_if(|(k, _)| *k == r) {
                Some((_, status)) => take_in(status, o),
                None => added.push((r, o)),
            }
        }
        gone.extend(mine.map(|(k, _)| k.clone()));
        for r in gone {
            self.objects.remove(&r);
        }
        for (r, o) in added {
            take_in(self.objects.entry(r.clone()).or_insert_with(|| ObjectStatus::new(r)), o);
        }
        for status in self.objects.values_mut() {
            if status.observed_generation != status.generation {
                status.set(
                    &ConditionType::Reconciling,
                    true,
                    Reason::SpecChanged,
                    "converging to the new generation",
                );
            }
        }
    }

    /// Sets a condition; its transition time moves only when its status flips.
    pub fn set(&mut self, r: &ObjectRef, kind: ConditionType, status: bool, reason: Reason, message: &str) {
        if let Some(object) = self.objects.get_mut(r) {
            object.set(&kind, status, reason, message);
        }
    }

    /// Sets `Stalled` and not `Ready`, for the same reason.
    pub fn stalled(&mut self, r: &ObjectRef, reason: Reason, message: &str) {
        self.set(r, ConditionType::Stalled, true, reason, message);
        self.set(r, ConditionType::Ready, false, reason, message);
    }

    /// Every object but `failed` converged at its generation.
    pub fn converged_except(&mut self, failed: &BTreeSet<ObjectRef>) {
        for (_, o) in self.objects.iter_mut().filter(|(r, _)| !failed.contains(*r)) {
            o.observed_generation = o.generation;
            o.set(
                &ConditionType::Ready,
                true,
                Reason::Converged,
                "running what the document asks for",
            );
            o.set(&ConditionType::Reconciling, false, Reason::Converged, "");
            o.set(&ConditionType::Stalled, false, Reason::Converged, "");
        }
    }

    /// The objects of `path` keep their last good version: the file fails to load now.
    pub fn invalid(&mut self, path: &Path, message: &str) {
        let shown = path.display().to_string();
        for o in self.objects.values_mut().filter(|s| s.path == shown) {
            o.set(&ConditionType::Invalid, true, Reason::LoadFailed, message);
        }
    }

    /// Takes in which files fail to load now (the first error of each; diagnostics are in file
    /// order), and clears `Invalid` from objects whose file loads again.
    pub fn files_failing(&mut self, diagnostics: &[crate::manifest::Diagnostic]) {
        let mut files: Vec<FileError> = Vec::new();
        for d in diagnostics.iter().filter(|d| d.is_error()) {
            let path = d.location.path.display().to_string();
            match files.iter_mut().find(|f| f.path == path) {
                Some(file) => file.errors += 1,
                None => files.push(FileError {
                    path,
                    location: d.location.to_string(),
                    message: d.message.clone(),
                    errors: 1,
                }),
            }
        }
        self.file_errors = files;
        let failing: BTreeSet<&str> = self.file_errors.iter().map(|f| f.path.as_str()).collect();
        for o in self.objects.values_mut() {
            if o.holds(&ConditionType::Invalid) && !failing.contains(o.path.as_str()) {
                o.set(&ConditionType::Invalid, false, Reason::Loaded, "");
            }
        }
    }

    pub fn restart_required(&mut self, r: &ObjectRef, field: &str) {
        self.set(
            r,
            ConditionType::RestartRequired,
            true,
            Reason::FieldNeedsRestart,
            &format!("`{field}` changed: restart tbot to apply it"),
        );
    }

    /// The text of `controller/status.json` for this table, or `None` when the file already holds
    /// it (as `saved` knows); serializes only the objects whose status changed since.
    pub fn status_file(&self, saved: &mut SavedStatus) -> Option<String> {
        saved.render(&self.objects)
    }
}

/// Takes an object's path, source and document into its status; a new document (another hash) is
/// a new generation.
fn take_in(status: &mut ObjectStatus, o: &Arc<crate::manifest::Object>) {
    if status.object.as_ref().is_some_and(|was| Arc::ptr_eq(was, o)) {
        // The same parse as last time (every unchanged object of a reload).
        return;
    }
    // Compared as bytes (a path's `!=` walks its components).
    if o.location.path.as_os_str() != std::ffi::OsStr::new(&status.path) {
        status.path = o.location.path.display().to_string();
    }
    if status.hash != o.hash {
        status.hash = o.hash.clone();
        status.generation += 1;
    }
    status.object = Some(o.clone());
}

/// The link from an agent to its remote issuer, as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuerLink {
    pub address: String,
    pub connected: bool,
    /// Why it is down, or what it last did.
    pub message: String,
    /// Why the issuer refuses the bot certificate, while it does; empty otherwise.
    pub refused: String,
}

/// A socket served or a file output, as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub name: String,
    /// The socket, for a `workload-identity-api` service.
    pub listen: String,
    /// The directory, for a file output.
    pub destination: String,
    /// What the output last did.
    pub state: String,
    /// Whether it does what it is for: serving, or written with its hook run.
    pub healthy: bool,
}

/// What the host runs, besides the objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStatus {
    pub trust_domain: String,
    /// `sha256:<hex>` of each CA certificate's SubjectPublicKeyInfo in the trust bundle in force.
    pub ca_pins: Vec<String>,
    pub bot: String,
    pub bot_expires: String,
    /// Why the host has no bot yet although it has an agent config (it has not joined); empty
    /// otherwise.
    pub bot_pending: String,
    /// The sockets served and the file outputs.
    pub services: Vec<ServiceState>,
    /// The issuer API's address, on an issuer host.
    pub issuer_listen: String,
    /// The link to the remote issuer, on an agent of one.
    pub issuer_link: Option<IssuerLink>,
    /// The issuer's store (`etcd http://…`), on an issuer host.
    pub issuer_storage: String,
    /// This replica's name, on an issuer host.
    pub replica: String,
    /// The bundle endpoint's URL, when it serves one.
    pub bundle_endpoint: String,
}

impl HostStatus {
    /// The names of the services that do what they are for.
    pub fn serving(&self) -> impl Iterator<Item = &str> {
        self.services
            .iter()
            .filter(|s| !s.listen.is_empty() || s.healthy)
            .map(|s| s.name.as_str())
    }
}

/// Everything status shows: one value.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub table: StatusTable,
    pub host: HostStatus,
}

impl Status {
    /// Whether every object runs its current generation and is `Ready`.
    pub fn all_ready(&self) -> bool {
        self.table.objects.values().all(|s| s.is_ready())
    }
}

/// The one writer of the status. Not `Clone`: the daemon owns it.
pub struct StatusWriter {
    tx: watch::Sender<Status>,
}

impl StatusWriter {
    pub fn new(status: Status) -> StatusWriter {
        StatusWriter {
            tx: watch::Sender::new(status),
        }
    }

    /// A reader: sees every update, and is woken by each.
    pub fn reader(&self) -> StatusReader {
        StatusReader {
            rx: self.tx.subscribe(),
        }
    }

    /// Changes the status and wakes every reader.
    pub fn update<R>(&mut self, change: impl FnOnce(&mut Status) -> R) -> R {
        let mut out = None;
        self.tx.send_modify(|s| out = Some(change(s)));
        out.expect("send_modify runs the closure")
    }
}

/// A cheap, cloneable reader of the status.
#[derive(Clone)]
pub struct StatusReader {
    rx: watch::Receiver<Status>,
}

impl StatusReader {
    /// The status as it is now (a read lock: do not hold it across an await).
    pub fn get(&self) -> watch::Ref<'_, Status> {
        self.rx.borrow()
    }

    /// Waits for the next update; `false` once the writer is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Counts what is there now as seen: [`StatusReader::changed`] waits for the next update.
    pub fn mark_unchanged(&mut self) {
        self.rx.mark_unchanged();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn every_reader_sees_the_one_writers_update_and_is_woken_by_it() {
        let mut writer = StatusWriter::new(Status::default());
        let (mut admin, diag) = (writer.reader(), writer.reader());
        admin.mark_unchanged();
        writer.update(|s| s.host.ca_pins = vec!["sha256:ab".into()]);
        assert!(admin.changed().await);
        assert_eq!(admin.get().host.ca_pins, diag.get().host.ca_pins);
        drop(writer);
        assert!(!admin.changed().await, "a reader learns that the writer is gone");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_flips() {
        let r = ObjectRef::new(crate::resource::Kind::Bot, "b");
        let mut o = ObjectStatus::new(&r);
        o.set(&ConditionType::Ready, false, Reason::JoinFailed, "no");
        let ready = ConditionType::Ready;
        let first = o.condition(&ready).unwrap().last_transition_time.clone();
        o.set(&ConditionType::Ready, false, Reason::RejoinFailed, "still no");
        assert_eq!(o.condition(&ready).unwrap().last_transition_time, first);
        assert_eq!(o.condition(&ready).unwrap().reason, "RejoinFailed");
        o.set(&ConditionType::Output("web".into()), true, Reason::Written, "");
        assert!(o.holds(&ConditionType::Output("web".into())));
    }

    #[test]
    fn the_status_file_is_made_again_only_when_a_status_changed_or_the_last_write_failed() {
        let store = Store::memory();
        let mut table = StatusTable::default();
        for name in ["a", "b", "c"] {
            let r = ObjectRef::new(crate::resource::Kind::Bot, name);
            table.objects.insert(r.clone(), ObjectStatus::new(&r));
        }
        let mut saved = SavedStatus::default();
        let text = table.status_file(&mut saved).expect("nothing written yet");
        let whole: Vec<ObjectStatus> = serde_json::from_str(&text).unwrap();
        assert_eq!(whole, table.objects.values().cloned().collect::<Vec<_>>());
        // Not written (as when the disk is full): made again.
        assert!(table.status_file(&mut saved).is_some());
        saved.write(&store, &text).unwrap();
        assert!(table.status_file(&mut saved).is_none(), "written, and nothing changed");

        let b = ObjectRef::new(crate::resource::Kind::Bot, "b");
        table.set(&b, ConditionType::Ready, true, Reason::Joined, "");
        let text = table.status_file(&mut saved).expect("b changed");
        let whole: Vec<ObjectStatus> = serde_json::from_str(&text).unwrap();
        assert_eq!(whole, table.objects.values().cloned().collect::<Vec<_>>());
        saved.write(&store, &text).unwrap();
        // An object's text and applied document are applied.json's: not saved here twice.
        let text = "kind: bot # only in applied.json\nversion: v1\nmetadata: {name: b}\nspec: {roles: []}\n";
        let loaded = crate::manifest::load_bytes(Path::new("b.yaml"), text.as_bytes().to_vec());
        table.objects.get_mut(&b).unwrap().object = loaded.state.objects.get(&b).cloned();
        assert!(table.objects[&b].source().contains("only in applied.json"));
        assert!(
            table.status_file(&mut saved).is_none(),
            "the file does not hold b's text"
        );
        table.set(&b, ConditionType::Ready, false, Reason::Pending, "waiting");
        let text = table.status_file(&mut saved).expect("b changed");
        assert!(!text.contains("only in applied.json"), "{text}");
        assert_eq!(text.lines().count(), 5, "one object per line: {text}");
        saved.write(&store, &text).unwrap();
        table.objects.remove(&b);
        let text = table.status_file(&mut saved).expect("b went");
        assert_eq!(serde_json::from_str::<Vec<ObjectStatus>>(&text).unwrap().len(), 2);
        let on_disk: Vec<ObjectStatus> = serde_json::from_slice(&store.read(FILE).unwrap().unwrap()).unwrap();
        assert_eq!(on_disk.len(), 3, "the file holds the last written table");
    }
}
