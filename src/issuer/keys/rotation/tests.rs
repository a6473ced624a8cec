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
        tainted: None,
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
            Step::Taint { .. } | Step::Revoke => unreachable!("only ever by hand"),
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
    let rotate = |grace: u64, force| ByHand::Rotate {
        grace: Duration::from_secs(grace),
        force,
    };
    let step = by_hand(&records, active, rotate(600, false), 5 * HOUR).unwrap();
    assert_eq!(
        step,
        Step::Prepare {
            activate_at: 5 * HOUR + 600
        }
    );
    let mut prepared = key(2, 5 * HOUR, 100 * HOUR);
    prepared.activate_at = Some(5 * HOUR + 600);
    records.push(prepared);
    let refused = by_hand(&records, active, rotate(600, false), 5 * HOUR)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("key 2 is prepared until"), "{refused}");
    assert!(refused.contains("--force"), "{refused}");
    assert_eq!(
        by_hand(&records, active, rotate(0, true), 5 * HOUR),
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

#[test]
fn a_second_rotation_prepares_while_the_first_key_retires_and_a_third_key_is_published() {
    let mut records = vec![key(1, 0, 100 * HOUR), key(2, HOUR, 100 * HOUR)];
    records[0].retire_after = Some(3 * HOUR);
    let active = 2;
    let rotate = ByHand::Rotate {
        grace: Duration::from_secs(30),
        force: false,
    };
    assert_eq!(
        by_hand(&records, active, rotate, 2 * HOUR),
        Ok(Step::Prepare {
            activate_at: 2 * HOUR + 30
        }),
        "a retiring key is not in the way"
    );
    let mut third = key(3, 2 * HOUR, 100 * HOUR);
    third.activate_at = Some(2 * HOUR + 30);
    records.push(third);
    let phases: Vec<&str> = records.iter().map(|r| phase(r, active).name()).collect();
    assert_eq!(phases, ["retiring", "active", "prepared"]);
    let mut active = active;
    activate(&mut records, &mut active, 3, |_| 2 * HOUR + 60);
    let phases: Vec<&str> = records.iter().map(|r| phase(r, active).name()).collect();
    assert_eq!(phases, ["retiring", "retiring", "active"]);
    // Each retires on its own schedule.
    let mut keys = vec![(); 3];
    assert!(retire(&mut records, &mut keys, active, 2 * HOUR + 61));
    assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 3]);
    assert!(retire(&mut records, &mut keys, active, 3 * HOUR));
    assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [3]);
}

#[test]
fn taint_activates_the_prepared_key_and_taints_the_replaced_ones_then_revoke_withdraws_them() {
    let now = 5 * HOUR;
    let mut records = vec![key(1, 0, 100 * HOUR)];
    let mut keys = vec!["one"];
    let mut active = 1;
    let refused = by_hand(&records, active, ByHand::TaintOld, now).unwrap_err().0;
    assert!(
        refused.contains("nothing to taint") && refused.contains("--grace"),
        "{refused}"
    );
    let refused = by_hand(&records, active, ByHand::RevokeOld, now).unwrap_err().0;
    assert!(refused.contains("nothing to revoke"), "{refused}");
    let mut prepared = key(2, now, 100 * HOUR);
    prepared.activate_at = Some(now + 600);
    records.push(prepared);
    keys.push("two");
    let step = by_hand(&records, active, ByHand::TaintOld, now).unwrap();
    assert_eq!(step, Step::Taint { activate: Some(2) });
    activate(&mut records, &mut active, 2, |_| now + HOUR);
    assert_eq!(taint(&mut records, active, now), [1]);
    assert_eq!(phase(&records[0], active), Phase::Tainted { until: now + HOUR });
    assert_eq!(phase(&records[1], active), Phase::Active);
    // Tainted already: a second taint has nothing to do; the schedule would still retire it.
    let refused = by_hand(&records, active, ByHand::TaintOld, now).unwrap_err().0;
    assert!(refused.contains("--revoke-old"), "{refused}");
    assert_eq!(
        due(
            &records,
            active,
            &Rotation::default_for(Duration::from_secs(100 * 3600)),
            now + HOUR
        )
        .0,
        Some(Step::Retire)
    );
    assert_eq!(by_hand(&records, active, ByHand::RevokeOld, now), Ok(Step::Revoke));
    let revoked = revoke(&mut records, &mut keys, active, now + 1, |k| k.to_string());
    assert_eq!(keys, ["two"]);
    assert_eq!(records.len(), 1);
    assert_eq!(
        revoked,
        [RevokedKey {
            id: 1,
            name: "one".into(),
            created: 0,
            not_after: 100 * HOUR,
            revoked_at: now + 1
        }]
    );
}

#[test]
fn a_retiring_key_that_is_not_tainted_is_not_revoked() {
    let mut records = vec![key(1, 0, 100 * HOUR), key(2, HOUR, 100 * HOUR)];
    records[0].retire_after = Some(3 * HOUR);
    let refused = by_hand(&records, 2, ByHand::RevokeOld, 2 * HOUR).unwrap_err().0;
    assert!(refused.contains("key 1 is retiring, not tainted"), "{refused}");
    assert_eq!(
        by_hand(&records, 2, ByHand::TaintOld, 2 * HOUR),
        Ok(Step::Taint { activate: None })
    );
    // A forced rotation does not withdraw a tainted key: --revoke-old does, after its check.
    records[0].tainted = Some(2 * HOUR);
    let forced = ByHand::Rotate {
        grace: Duration::ZERO,
        force: true,
    };
    let refused = by_hand(&records, 2, forced, 2 * HOUR).unwrap_err().0;
    assert!(refused.contains("--revoke-old"), "{refused}");
    records.insert(1, key(3, HOUR, 100 * HOUR));
    records[1].retire_after = Some(3 * HOUR);
    assert_eq!(by_hand(&records, 2, forced, 2 * HOUR), Ok(Step::RetireEarly));
    let mut keys = vec![(); 3];
    assert!(retire_early(&mut records, &mut keys, 2));
    assert_eq!(
        records.iter().map(|r| r.id).collect::<Vec<_>>(),
        [1, 2],
        "the tainted key stays"
    );
}
