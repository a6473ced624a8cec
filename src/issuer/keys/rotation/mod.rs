//! The rotation schedule shared by the CA and the JWT signing key, SPIRE's way: a successor is
//! *prepared* (published in every bundle, signing nothing) `prepare_before` the active key's end,
//! *activated* at its `activate_at` (signs from then on; the old key stays published), and the old key
//! is *retired* once everything it signed has expired. Every decision is a pure function of the
//! records and a time, so a restart in the middle resumes from the store, and tests step time by hand.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One key as its store file records it (`ca.json`'s `cas`, `jwt.json`'s `keys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: u32,
    pub algorithm: String,
    /// Unix seconds.
    pub not_after: i64,
    /// The latest expiry of anything this key signed, rounded up (Unix seconds).
    pub issued_until: i64,
    /// Set when a newer key took over: the key stays published until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<i64>,
    /// The validity it was made with (seconds; absent in keys of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity: Option<u64>,
    /// Set while the key is prepared: when it starts signing (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<i64>,
    /// When the key was made (Unix seconds; 0 in keys of earlier versions).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: i64,
    /// Set when an operator tainted the key (`tbotctl rotate --taint-old`, Unix seconds): still
    /// published, so what it signed keeps verifying, while every agent issues that again now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tainted: Option<i64>,
}

/// A key withdrawn from every bundle by hand (`tbotctl rotate --revoke-old`): remembered in the key
/// file for `tbotctl status` until its own end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedKey {
    pub id: u32,
    /// The CA's SPKI pin, or the JWT key's `kid`.
    pub name: String,
    pub created: i64,
    pub not_after: i64,
    /// When it was withdrawn (Unix seconds).
    pub revoked_at: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// When a successor is prepared and activated, before the active key's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub prepare_before: Duration,
    pub activate_before: Duration,
}

impl Rotation {
    /// SPIRE's thresholds: ½ and ⅙ of the validity.
    pub fn default_for(validity: Duration) -> Rotation {
        Rotation {
            prepare_before: validity / 2,
            activate_before: validity / 6,
        }
    }
}

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Published, signing nothing yet; signs from `activate_at`.
    Prepared { activate_at: i64 },
    /// Signs.
    Active,
    /// Replaced; published until `until`.
    Retiring { until: i64 },
    /// Replaced and tainted by an operator: published until `until` (or until revoked), while
    /// every agent issues again what it signed.
    Tainted { until: i64 },
    /// Withdrawn from every bundle by an operator at `at` (only ever a [`RevokedKey`]).
    Revoked { at: i64 },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Prepared { .. } => "prepared",
            Phase::Active => "active",
            Phase::Retiring { .. } => "retiring",
            Phase::Tainted { .. } => "tainted",
            Phase::Revoked { .. } => "revoked",
        }
    }

    /// Until when a replaced key (retiring or tainted) stays published.
    pub fn published_until(&self) -> Option<i64> {
        match self {
            Phase::Retiring { until } | Phase::Tainted { until } => Some(*until),
            _ => None,
        }
    }

    /// When this phase ends (Unix seconds): activation, retirement, or `None` for the active key
    /// (its successor's schedule says).
    pub fn ends(&self) -> Option<i64> {
        match self {
            Phase::Prepared { activate_at } => Some(*activate_at),
            Phase::Active | Phase::Revoked { .. } => None,
            Phase::Retiring { until } | Phase::Tainted { until } => Some(*until),
        }
    }
}

/// The phase of `record` when `active` is the id of the signing key.
pub fn phase(record: &KeyRecord, active: u32) -> Phase {
    if record.id == active {
        Phase::Active
    } else if let Some(at) = record.activate_at {
        Phase::Prepared { activate_at: at }
    } else {
        // A replica that signed with the key before it saw the activation notes that later
        // (`issued_until`): the key stays until that has expired too, never past its own end.
        let until = record.retire_after.unwrap_or(record.not_after);
        let until = until.max(record.issued_until.min(record.not_after));
        match record.tainted {
            Some(_) => Phase::Tainted { until },
            None => Phase::Retiring { until },
        }
    }
}

/// A step of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Make a successor that activates at `activate_at`.
    Prepare { activate_at: i64 },
    /// The prepared key `id` signs from now on.
    Activate { id: u32 },
    /// Drop the retiring keys whose time has come.
    Retire,
    /// Drop every retiring key now, by hand (`tbotctl rotate --force`): what they signed stops
    /// verifying.
    RetireEarly,
    /// Taint every replaced key (`tbotctl rotate --taint-old`), after activating the prepared key
    /// `activate` first if there is one: agents issue again now what a tainted key signed.
    Taint { activate: Option<u32> },
    /// Withdraw every tainted key from the bundles now (`tbotctl rotate --revoke-old`).
    Revoke,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The step due at `now`, if any, and otherwise when the next one will be due.
pub fn due(records: &[KeyRecord], active: u32, rotation: &Rotation, now: i64) -> (Option<Step>, Option<i64>) {
    let mut next: Option<i64> = None;
    let mut at = |t: i64| next = Some(next.map_or(t, |n| n.min(t)));
    let Some(current) = records.iter().find(|r| r.id == active) else {
        return (None, None);
    };
    for record in records {
        match phase(record, active) {
            Phase::Retiring { until } | Phase::Tainted { until } if until <= now => return (Some(Step::Retire), None),
            Phase::Retiring { until } | Phase::Tainted { until } => at(until),
            Phase::Prepared { activate_at } if activate_at <= now => {
                return (Some(Step::Activate { id: record.id }), None);
            }
            Phase::Prepared { activate_at } => at(activate_at),
            Phase::Active | Phase::Revoked { .. } => {}
        }
    }
    let prepared = records
        .iter()
        .any(|r| matches!(phase(r, active), Phase::Prepared { .. }));
    if !prepared {
        let prepare_at = current.not_after - secs(rotation.prepare_before);
        if prepare_at <= now {
            let activate_at = (current.not_after - secs(rotation.activate_before)).max(now);
            return (Some(Step::Prepare { activate_at }), None);
        }
        at(prepare_at);
    }
    (None, next)
}

/// Makes the prepared key `id` the active one: the old active key retires once what it signed has
/// expired (`retire_after`: its `issued_until`, never past its own end, which caps everything it
/// signs). Returns the old active id.
pub fn activate(records: &mut [KeyRecord], active: &mut u32, id: u32, retire_after: impl Fn(&KeyRecord) -> i64) {
    let old = *active;
    for record in records.iter_mut() {
        if record.id == old {
            record.retire_after = Some(retire_after(record));
        }
        if record.id == id {
            record.activate_at = None;
        }
    }
    *active = id;
}

/// Drops every retiring key now (`tbotctl rotate --force`), but not a tainted one: that goes by
/// [`revoke`], which is checked first. Returns whether any went.
pub fn retire_early<T>(records: &mut Vec<KeyRecord>, keys: &mut Vec<T>, active: u32) -> bool {
    let keep: Vec<bool> = records
        .iter()
        .map(|r| !matches!(phase(r, active), Phase::Retiring { .. }))
        .collect();
    let mut i = 0;
    records.retain(|_| (keep[i], i += 1).0);
    let mut i = 0;
    keys.retain(|_| (keep[i], i += 1).0);
    keep.iter().any(|k| !k)
}

/// Drops the retiring keys whose time has come; returns whether any went.
pub fn retire<T>(records: &mut Vec<KeyRecord>, keys: &mut Vec<T>, active: u32, now: i64) -> bool {
    let keep: Vec<bool> = records
        .iter()
        .map(|r| phase(r, active).published_until().is_none_or(|until| until > now))
        .collect();
    if keep.iter().all(|k| *k) {
        return false;
    }
    let mut i = 0;
    records.retain(|_| (keep[i], i += 1).0);
    let mut i = 0;
    keys.retain(|_| (keep[i], i += 1).0);
    true
}

/// A rotation by hand refused: what is in the way, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What an operator asks of a key (`tbotctl rotate ca|jwt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByHand {
    /// Prepare a successor that signs after `grace`; with `force`, take the rotation's next step
    /// now instead (activate the prepared key, or withdraw the replaced ones).
    Rotate { grace: Duration, force: bool },
    /// `--taint-old`: activate the prepared key if there is one, and taint every replaced key.
    TaintOld,
    /// `--revoke-old`: withdraw every tainted key from the bundles.
    RevokeOld,
}

/// A rotation asked for by hand (`tbotctl rotate`): what to do, or why not. A successor can be
/// prepared while older keys are still retiring (SPIRE allows it: the bundle then carries three
/// keys), so two rotations in a row need no `--force`; only a key that is prepared already is in
/// the way.
pub fn by_hand(records: &[KeyRecord], active: u32, asked: ByHand, now: i64) -> Result<Step, Refused> {
    let phases: Vec<(u32, Phase)> = records.iter().map(|r| (r.id, phase(r, active))).collect();
    let prepared = phases.iter().find(|(_, p)| matches!(p, Phase::Prepared { .. }));
    let replaced = |tainted: bool| {
        phases
            .iter()
            .filter(|(_, p)| matches!(p, Phase::Tainted { .. }) == tainted && p.published_until().is_some())
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>()
    };
    let (retiring, tainted) = (replaced(false), replaced(true));
    let prepared_id = prepared.map(|(id, _)| *id);
    match (asked, prepared_id) {
        (ByHand::Rotate { force: true, .. }, Some(id)) => Ok(Step::Activate { id }),
        (ByHand::Rotate { force: true, .. }, None) if !retiring.is_empty() => Ok(Step::RetireEarly),
        (ByHand::Rotate { force: true, .. }, None) if !tainted.is_empty() => Err(Refused(format!(
            "key {} is tainted: withdraw it with --revoke-old, which first checks that no agent still depends on it",
            tainted.join(", ")
        ))),
        (ByHand::Rotate { .. }, Some(id)) => Err(Refused(format!(
            "a rotation is in progress: key {id} is prepared until {}; wait for it, or pass --force to activate it now",
            rfc3339(prepared.and_then(|(_, p)| p.ends()).unwrap_or(now))
        ))),
        (ByHand::Rotate { grace, .. }, None) => Ok(Step::Prepare {
            activate_at: now + secs(grace),
        }),
        (ByHand::TaintOld, Some(id)) => Ok(Step::Taint { activate: Some(id) }),
        (ByHand::TaintOld, None) if !retiring.is_empty() => Ok(Step::Taint { activate: None }),
        (ByHand::TaintOld, None) if !tainted.is_empty() => Err(Refused(format!(
            "key {} is tainted already and no other key is replaced: withdraw it with --revoke-old",
            tainted.join(", ")
        ))),
        (ByHand::TaintOld, None) => Err(Refused(format!(
            "nothing to taint: key {active} is the only key and it signs. Prepare a successor first \
             (`tbotctl rotate KEY --grace 1m`), then pass --taint-old: it activates the successor at once \
             and taints key {active}"
        ))),
        (ByHand::RevokeOld, _) if !tainted.is_empty() => Ok(Step::Revoke),
        (ByHand::RevokeOld, _) if !retiring.is_empty() => Err(Refused(format!(
            "key {} is retiring, not tainted: taint it first (--taint-old) so that every agent issues again \
             what it signed, then revoke it",
            retiring.join(", ")
        ))),
        (ByHand::RevokeOld, _) => Err(Refused(format!(
            "nothing to revoke: no key is tainted (key {active} signs). Prepare a successor, taint the old key \
             with --taint-old, then revoke it"
        ))),
    }
}

/// Taints every replaced key not tainted yet (after `activate` made the prepared key the active
/// one). Returns the ids tainted.
pub fn taint(records: &mut [KeyRecord], active: u32, now: i64) -> Vec<u32> {
    let mut out = Vec::new();
    for record in records.iter_mut() {
        if matches!(phase(record, active), Phase::Retiring { .. }) {
            record.tainted = Some(now);
            out.push(record.id);
        }
    }
    out
}

/// Withdraws every tainted key (its record and its key), returning what `tbotctl status` keeps of
/// each; `name` gives a key's pin or `kid`.
pub fn revoke<T>(
    records: &mut Vec<KeyRecord>,
    keys: &mut Vec<T>,
    active: u32,
    now: i64,
    name: impl Fn(&T) -> String,
) -> Vec<RevokedKey> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < records.len() {
        if matches!(phase(&records[i], active), Phase::Tainted { .. }) {
            let record = records.remove(i);
            let key = keys.remove(i);
            out.push(RevokedKey {
                id: record.id,
                name: name(&key),
                created: record.created,
                not_after: record.not_after,
                revoked_at: now,
            });
        } else {
            i += 1;
        }
    }
    out
}

/// A Unix time as RFC 3339.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix).map_or_else(|_| unix.to_string(), crate::rfc3339)
}

/// One key's state, for `tbotctl status`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    /// `ca` or `jwt`.
    pub kind: &'static str,
    pub id: u32,
    /// The CA's SPKI pin, or the JWT key's `kid`.
    pub name: String,
    pub phase: Phase,
    pub created: i64,
    pub not_after: i64,
}

impl KeyStatus {
    /// A key withdrawn by hand, as `tbotctl status` shows it.
    pub fn revoked(kind: &'static str, key: &RevokedKey) -> KeyStatus {
        KeyStatus {
            kind,
            id: key.id,
            name: key.name.clone(),
            phase: Phase::Revoked { at: key.revoked_at },
            created: key.created,
            not_after: key.not_after,
        }
    }
}

impl crate::error::Explain for Refused {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // The message says what to do.
        "".into()
    }
}

#[cfg(test)]
mod tests;
