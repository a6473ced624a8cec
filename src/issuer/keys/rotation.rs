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
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Prepared { .. } => "prepared",
            Phase::Active => "active",
            Phase::Retiring { .. } => "retiring",
        }
    }

    /// When this phase ends (Unix seconds): activation, retirement, or `None` for the active key
    /// (its successor's schedule says).
    pub fn ends(&self) -> Option<i64> {
        match self {
            Phase::Prepared { activate_at } => Some(*activate_at),
            Phase::Active => None,
            Phase::Retiring { until } => Some(*until),
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
        Phase::Retiring {
            until: until.max(record.issued_until.min(record.not_after)),
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
            Phase::Retiring { until } if until <= now => return (Some(Step::Retire), None),
            Phase::Retiring { until } => at(until),
            Phase::Prepared { activate_at } if activate_at <= now => {
                return (Some(Step::Activate { id: record.id }), None);
            }
            Phase::Prepared { activate_at } => at(activate_at),
            Phase::Active => {}
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

/// Drops the retiring keys whose time has come; returns whether any went.
pub fn retire<T>(records: &mut Vec<KeyRecord>, keys: &mut Vec<T>, active: u32, now: i64) -> bool {
    let keep: Vec<bool> = records
        .iter()
        .map(|r| !matches!(phase(r, active), Phase::Retiring { until } if until <= now))
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

/// A rotation by hand refused: one is already in progress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a rotation is in progress: key {id} is {phase} until {until}; wait for it, or pass --force to {forced} now")]
pub struct InProgress {
    pub id: u32,
    pub phase: &'static str,
    /// When the phase ends (RFC 3339).
    pub until: String,
    /// What `--force` would do: `activate it` or `retire it`.
    pub forced: &'static str,
}

/// A rotation asked for by hand (`tbotctl rotate`): what to do, or why not.
pub fn by_hand(records: &[KeyRecord], active: u32, grace: Duration, force: bool, now: i64) -> Result<Step, InProgress> {
    let busy = records
        .iter()
        .map(|r| (r, phase(r, active)))
        .find(|(_, p)| !matches!(p, Phase::Active));
    match busy {
        None => Ok(Step::Prepare {
            activate_at: now + secs(grace),
        }),
        Some((record, Phase::Prepared { .. })) if force => Ok(Step::Activate { id: record.id }),
        Some(_) if force => Ok(Step::RetireEarly),
        Some((record, phase)) => Err(InProgress {
            id: record.id,
            phase: phase.name(),
            until: rfc3339(phase.ends().unwrap_or(record.not_after)),
            forced: if matches!(phase, Phase::Prepared { .. }) {
                "activate it"
            } else {
                "retire it"
            },
        }),
    }
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

impl crate::error::Explain for InProgress {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // The message says it: wait, or `--force`.
        "".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600;

    fn key(id: u32, created: i64, validity: i64) -> KeyRecord {
        KeyRecord {
            id,
            algorithm: "ecdsa-p256".into(),
            not_after: created + validity,
            issued_until: created,
            retire_after: None,
            validity: Some(validity as u64),
            activate_at: None,
            created,
        }
    }

    /// Runs the schedule from 0 to `until`, jumping from one due time to the next as a clock
    /// would, and returns what happened when.
    /// When, what, and every key's phase after it.
    type Trace = Vec<(i64, Step, Vec<(u32, Phase)>)>;

    fn run(validity: i64, rotation: Rotation, svid_ttl: i64, until: i64) -> Trace {
        let mut records = vec![key(1, 0, validity)];
        let mut keys = vec![()];
        let mut active = 1;
        let mut now = 0;
        let mut log = Vec::new();
        while now <= until {
            let (step, next) = due(&records, active, &rotation, now);
            let Some(step) = step else {
                now = next.expect("something is always due later");
                continue;
            };
            match step {
                Step::Prepare { activate_at } => {
                    let id = records.iter().map(|r| r.id).max().unwrap() + 1;
                    let mut record = key(id, now, validity);
                    record.activate_at = Some(activate_at);
                    records.push(record);
                    keys.push(());
                }
                Step::Activate { id } => {
                    // The active key signed SVIDs up to now, each living `svid_ttl` at most.
                    activate(&mut records, &mut active, id, |r| {
                        (now + svid_ttl).max(r.issued_until).min(r.not_after)
                    });
                }
                Step::Retire | Step::RetireEarly => {
                    assert!(retire(&mut records, &mut keys, active, now));
                }
            }
            let phases = records.iter().map(|r| (r.id, phase(r, active))).collect();
            log.push((now, step, phases));
        }
        log
    }

    #[test]
    fn the_default_schedule_prepares_at_half_life_activates_at_five_sixths_and_retires_after_the_svids() {
        let validity = 24 * HOUR;
        let log = run(
            validity,
            Rotation::default_for(Duration::from_secs(24 * 3600)),
            HOUR,
            48 * HOUR,
        );
        let steps: Vec<(i64, Step)> = log.iter().map(|(t, s, _)| (*t, *s)).collect();
        assert_eq!(
            steps[..3],
            [
                (12 * HOUR, Step::Prepare { activate_at: 20 * HOUR }),
                (20 * HOUR, Step::Activate { id: 2 }),
                (21 * HOUR, Step::Retire),
            ]
        );
        // The successor, prepared at 12 h, lives to 36 h: its own successor comes at 24 h.
        assert_eq!(steps[3], (24 * HOUR, Step::Prepare { activate_at: 32 * HOUR }));
        // At every moment exactly one key signs, and at most three are published.
        for (_, _, phases) in &log {
            assert_eq!(phases.iter().filter(|(_, p)| *p == Phase::Active).count(), 1);
            assert!(phases.len() <= 3, "{phases:?}");
        }
    }

    #[test]
    fn a_retiring_key_outlives_every_svid_it_signed_and_never_its_own_end() {
        let log = run(
            60,
            Rotation {
                prepare_before: Duration::from_secs(30),
                activate_before: Duration::from_secs(10),
            },
            20,
            200,
        );
        for (t, step, phases) in &log {
            if let Step::Activate { .. } = step {
                let until = phases.iter().find_map(|(_, p)| match p {
                    Phase::Retiring { until } => Some(*until),
                    _ => None,
                });
                // Activated at 50 (of 60): SVIDs of up to 20 s would reach 70, capped at the end (60).
                assert_eq!(until, Some(*t + 10), "{log:?}");
            }
        }
    }

    #[test]
    fn a_rotation_by_hand_prepares_now_and_a_second_is_refused_unless_forced() {
        let mut records = vec![key(1, 0, 100 * HOUR)];
        let active = 1;
        let step = by_hand(&records, active, Duration::from_secs(600), false, 5 * HOUR).unwrap();
        assert_eq!(
            step,
            Step::Prepare {
                activate_at: 5 * HOUR + 600
            }
        );
        let mut prepared = key(2, 5 * HOUR, 100 * HOUR);
        prepared.activate_at = Some(5 * HOUR + 600);
        records.push(prepared);
        let refused = by_hand(&records, active, Duration::from_secs(600), false, 5 * HOUR)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("key 2 is prepared until"), "{refused}");
        assert!(refused.contains("--force"), "{refused}");
        assert_eq!(
            by_hand(&records, active, Duration::ZERO, true, 5 * HOUR),
            Ok(Step::Activate { id: 2 })
        );
        // And the schedule itself activates it at the grace's end, not at the automatic time.
        assert_eq!(
            due(
                &records,
                active,
                &Rotation::default_for(Duration::from_secs(100 * 3600_u64)),
                5 * HOUR + 600
            )
            .0,
            Some(Step::Activate { id: 2 })
        );
    }
}
