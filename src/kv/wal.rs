//! The `directory` backend's write-ahead log: a committed transaction is one record appended to
//! `<scope>.<generation>.wal` beside the scope's directory (`issuer.1.wal`), and every transaction
//! waiting at that moment shares one `fdatasync`. The files under the scope are written from memory
//! afterwards, many at a time with one `syncfs`, while appends go on in the next generation; only
//! then are the older logs removed. Opening replays the logs over the files, so a crash at any
//! point loses no transaction that was answered, and applies a transaction's writes all or none (a
//! torn last record is one nobody was answered for).
//!
//! A record: the payload's length (u32, little-endian), the first 8 bytes of its SHA-256, and the
//! payload, one operation after another: `1`, key length (u32), key, value length (u32), value for
//! a put; `2`, key length, key for a delete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Entry, Op};
use crate::store::{Secrecy, Store, StoreError};

const PUT: u8 = 1;
const DELETE: u8 = 2;
const HEADER: usize = 12;

/// The log of one scope: files `<scope>.<generation>.wal` in the storage directory, appended to
/// in the newest. Bringing the files up to date starts a new generation, so that appends go on
/// meanwhile; the older ones go once the files are durable ([`Cleanup`]).
pub(super) struct Log {
    root: PathBuf,
    stem: String,
    generation: u64,
    file: File,
    /// Bytes of whole records in the file.
    len: u64,
    /// A failed append may have left part of a record at the end: cut it before the next one.
    torn: bool,
}

/// Brings the files up to date with the logs before a generation, then removes those logs.
pub(super) struct Cleanup {
    root: PathBuf,
    stem: String,
    below: u64,
}

/// How a key is written to its file.
pub(super) fn secrecy(key: &str) -> Secrecy {
    if key.ends_with(".key") {
        Secrecy::Secret
    } else {
        Secrecy::Public
    }
}

/// Whether an operation of a transaction changes the files (and so goes in the log): any write of
/// a key under the scope. A put with a lease removes the key's file: a leased key lives as long as
/// this process at most.
pub(super) fn on_disk(op: &Op, scope: &str) -> bool {
    match op {
        Op::Put { key, .. } | Op::Delete(key) => key.starts_with(scope),
    }
}

/// What `op` leaves in the key's file: its value, or no file.
pub(super) fn file_of(op: &Op) -> Option<&[u8]> {
    match op {
        Op::Put { value, lease: 0, .. } => Some(value),
        _ => None,
    }
}

/// Why a log refuses a write: the key, and the reason (tbot chose the key or value: a bug).
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) key: String,
    pub(super) reason: String,
}

/// Refuses a write of `ops` to a key under the scope that names no file inside it (the check
/// [`Log::open`] makes of every key it reads back: one such key would stop the store from opening).
pub(super) fn check(ops: &[Op], scope: &str) -> Result<(), Refusal> {
    for op in ops.iter().filter(|op| on_disk(op, scope)) {
        let (Op::Put { key, .. } | Op::Delete(key)) = op;
        if let Some(why) = crate::store::name_problem(&key[scope.len()..]) {
            return Err(Refusal {
                key: key.escape_debug().to_string(),
                reason: format!("as a file of `{scope}`, {why}"),
            });
        }
    }
    Ok(())
}

/// Appends the record of `ops`' changes to the files (none when there are none) to `out`; refuses
/// a key or value of 4 GiB or more, which a record cannot hold.
pub(super) fn encode(ops: &[Op], scope: &str, out: &mut Vec<u8>) -> Result<(), Refusal> {
    let mut payload = Vec::new();
    let too_big = |what: &str, key: &str| Refusal {
        key: key.escape_debug().to_string(),
        reason: format!("its {what} is too large for the store's log (4 GiB or more)"),
    };
    let field = |payload: &mut Vec<u8>, bytes: &[u8]| -> Option<()> {
        payload.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_le_bytes());
        payload.extend_from_slice(bytes);
        Some(())
    };
    for op in ops.iter().filter(|op| on_disk(op, scope)) {
        let (Op::Put { key, .. } | Op::Delete(key)) = op;
        match file_of(op) {
            Some(value) => {
                payload.push(PUT);
                field(&mut payload, key.as_bytes()).ok_or_else(|| too_big("name", key))?;
                field(&mut payload, value).ok_or_else(|| too_big("value", key))?;
            }
            None => {
                payload.push(DELETE);
                field(&mut payload, key.as_bytes()).ok_or_else(|| too_big("name", key))?;
            }
        }
    }
    if payload.is_empty() {
        return Ok(());
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_big("transaction", first_key(ops, scope)))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload)[..8]);
    out.extend_from_slice(&payload);
    Ok(())
}

/// The first key under the scope that `ops` write (to name a transaction in a message).
fn first_key<'a>(ops: &'a [Op], scope: &str) -> &'a str {
    ops.iter().find(|op| on_disk(op, scope)).map_or("", |op| {
        let (Op::Put { key, .. } | Op::Delete(key)) = op;
        key.as_str()
    })
}

/// Whether a key read from a log names a file under the scope, and nothing outside it.
fn within(key: &str, scope: &str) -> bool {
    key.strip_prefix(scope)
        .is_some_and(|rest| crate::store::name_problem(rest).is_none())
}

/// One write of a record: the key and its new value (`None`: deleted).
type KeyWrite = (String, Option<Vec<u8>>);

/// The records of a log, in order, up to the first that is incomplete or does not match its sum;
/// and how many bytes they take.
fn decode(bytes: &[u8]) -> (Vec<Vec<KeyWrite>>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(record) = decode_one(&bytes[at..]) {
        let (writes, used) = record;
        records.push(writes);
        at += used;
    }
    (records, at)
}

fn decode_one(bytes: &[u8]) -> Option<(Vec<KeyWrite>, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    if Sha256::digest(payload)[..8] != bytes[4..HEADER] {
        return None;
    }
    let mut writes = Vec::new();
    let mut rest = payload;
    let take = |rest: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(head.to_vec())
    };
    while let Some((&tag, tail)) = rest.split_first() {
        rest = tail;
        let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
        let key = String::from_utf8(take(&mut rest, n)?).ok()?;
        let value = match tag {
            PUT => {
                let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
                Some(take(&mut rest, n)?)
            }
            DELETE => None,
            _ => return None,
        };
        writes.push((key, value));
    }
    Some((writes, HEADER + len))
}

/// The generations of `stem`'s logs in `root`, oldest first.
fn generations(root: &Path, stem: &str) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(generation) = name
            .strip_prefix(stem)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.strip_suffix(".wal"))
            .and_then(|n| n.parse().ok())
        {
            found.push(generation);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn log_path(root: &Path, stem: &str, generation: u64) -> PathBuf {
    root.join(format!("{stem}.{generation}.wal"))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |error| StoreError::Io { action, path, error }
}

impl Log {
    /// Opens the logs of `scope` in `store`'s directory, replays them in order over `files` (the
    /// scope's files as read), writes what they changed to the files, removes them and starts a new
    /// one. A torn last record (a crash during its write, never answered) is dropped with a warning.
    pub(super) fn open(store: &Store, scope: &str, files: &mut BTreeMap<String, Vec<u8>>) -> Result<Log, StoreError> {
        let root = store.root().expect("a log is kept in a directory").to_owned();
        let stem = scope.trim_end_matches('/').to_owned();
        let found = generations(&root, &stem).map_err(io_error("list", &root))?;
        let mut changed: BTreeMap<String, Option<Arc<Entry>>> = BTreeMap::new();
        for &generation in &found {
            let path = log_path(&root, &stem, generation);
            let bytes = std::fs::read(&path).map_err(io_error("read", &path))?;
            let (records, used) = decode(&bytes);
            let corrupt = |reason: String| StoreError::Corrupt {
                path: path.clone(),
                reason,
            };
            if used < bytes.len() {
                // Only the newest log can end in a write the process stopped in: an older one was
                // whole when the next began.
                if Some(&generation) != found.last() {
                    return Err(corrupt(format!(
                        "its record at byte {used} is damaged, and a newer log follows it"
                    )));
                }
                tracing::warn!(
                    log = %path.display(),
                    bytes = bytes.len() - used,
                    "dropping the incomplete record at the end of the store's log: a write the process stopped in, never answered"
                );
            }
            if let Some((key, _)) = records.iter().flatten().find(|(key, _)| !within(key, scope)) {
                return Err(corrupt(format!("it names `{key}`, outside `{scope}`")));
            }
            for (key, value) in records.into_iter().flatten() {
                match &value {
                    Some(value) => files.insert(key.clone(), value.clone()),
                    None => files.remove(&key),
                };
                let entry = value.map(|value| {
                    Arc::new(Entry {
                        key: key.clone(),
                        value,
                        create_revision: 0,
                        mod_revision: 0,
                        lease: 0,
                    })
                });
                changed.insert(key, entry);
            }
        }
        let generation = found.last().map_or(1, |last| last + 1);
        if !found.is_empty() {
            let cleanup = Cleanup {
                root: root.clone(),
                stem: stem.clone(),
                below: generation,
            };
            cleanup.run(store, &changed)?;
        }
        let path = log_path(&root, &stem, generation);
        let file = create(&path)?;
        Ok(Log {
            root,
            stem,
            generation,
            file,
            len: 0,
            torn: false,
        })
    }

    /// Appends records and waits for the disk: once this returns, they survive a crash. On
    /// failure the part written is cut away (now, or before the next append or rotation), so the
    /// failed records are not replayed. (Unless the process dies first: a transaction answered
    /// with a failure of the log may still come back, as with any storage.)
    pub(super) fn append(&mut self, records: &[u8]) -> io::Result<()> {
        let result = self.cut().and_then(|()| {
            self.file.write_all(records)?;
            self.file.sync_data()
        });
        match result {
            Ok(()) => self.len += records.len() as u64,
            Err(_) => {
                self.torn = true;
                let _ = self.cut();
            }
        }
        result
    }

    /// Cuts away what a failed append left after the whole records.
    fn cut(&mut self) -> io::Result<()> {
        if self.torn {
            self.file.set_len(self.len)?;
            self.file.sync_data()?;
            self.torn = false;
        }
        Ok(())
    }

    /// The file appended to now, for messages.
    pub(super) fn path(&self) -> PathBuf {
        log_path(&self.root, &self.stem, self.generation)
    }

    /// Bytes in the newest log.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Starts the next generation: appends go to a new, empty log from now on. This one must end
    /// with a whole record first.
    pub(super) fn rotate(&mut self) -> Result<(), StoreError> {
        let path = log_path(&self.root, &self.stem, self.generation + 1);
        self.cut()
            .map_err(io_error("cut the failed write from", &self.path()))?;
        self.file = create(&path)?;
        self.generation += 1;
        self.len = 0;
        self.torn = false;
        Ok(())
    }

    /// What brings the files up to date with the logs before this one.
    pub(super) fn cleanup(&self) -> Cleanup {
        Cleanup {
            root: self.root.clone(),
            stem: self.stem.clone(),
            below: self.generation,
        }
    }
}

/// Creates an empty log (`0600`: it holds private keys) and makes its name durable; on failure
/// leaves no file behind to be in the next attempt's way.
fn create(path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    let dir = path.parent().expect("a log inside the storage directory");
    let ready = file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("set the mode of", path))
        .and_then(|()| {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("sync the directory of", path))
        });
    if let Err(e) = ready {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

impl Cleanup {
    /// Writes `changed` (each key's value now; `None`, or a leased key: no file) to the files,
    /// makes them durable with one `syncfs`, then removes the logs before `below`. On failure the
    /// logs keep everything.
    pub(super) fn run(&self, store: &Store, changed: &BTreeMap<String, Option<Arc<Entry>>>) -> Result<(), StoreError> {
        for (key, entry) in changed {
            match entry {
                Some(entry) if entry.lease == 0 => store.write_unsynced(key, &entry.value, secrecy(key))?,
                _ => store.remove(key)?,
            }
        }
        store.sync()?;
        for generation in generations(&self.root, &self.stem).map_err(io_error("list", &self.root))? {
            if generation < self.below {
                let path = log_path(&self.root, &self.stem, generation);
                std::fs::remove_file(&path).map_err(io_error("remove", &path))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_torn_or_damaged_tail_is_dropped() {
        let mut log = Vec::new();
        let leased = Op::Put {
            key: "issuer/l".into(),
            value: b"v".to_vec(),
            lease: 7,
        };
        encode(
            &[
                Op::put("issuer/a", "1"),
                Op::Delete("issuer/b".into()),
                Op::put("other/c", "x"),
                leased,
            ],
            "issuer/",
            &mut log,
        )
        .unwrap();
        encode(&[Op::put("other/only", "x")], "issuer/", &mut log).unwrap();
        let first = log.len();
        encode(&[Op::put("issuer/a", "2")], "issuer/", &mut log).unwrap();
        let (records, used) = decode(&log);
        assert_eq!(used, log.len());
        // A leased put removes the key's file.
        assert_eq!(
            records,
            [
                vec![
                    ("issuer/a".to_owned(), Some(b"1".to_vec())),
                    ("issuer/b".to_owned(), None),
                    ("issuer/l".to_owned(), None)
                ],
                vec![("issuer/a".to_owned(), Some(b"2".to_vec()))]
            ]
        );
        // A record cut short, or with a byte changed, ends the log there.
        assert_eq!(decode(&log[..log.len() - 1]), (records[..1].to_vec(), first));
        let mut damaged = log.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&damaged).1, first);
    }

    #[test]
    fn a_logged_key_must_stay_under_the_scope() {
        for key in ["issuer/x/a.json", "issuer/x/bots/b@1.json"] {
            assert!(within(key, "issuer/"), "{key}");
        }
        for key in [
            "other/a",
            "issuer/../lock",
            "issuer/x/../../etc",
            "issuer//a",
            "issuer/./a",
            "issuer/",
        ] {
            assert!(!within(key, "issuer/"), "{key}");
        }
    }
}
