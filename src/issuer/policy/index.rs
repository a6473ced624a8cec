//! The identities a caller might pass, found without testing each of them: a label selector over
//! 10,000 identities, re-decided for every open stream after each edit, used to test all 10,000.
//!
//! An identity whose every rule has an `eq` condition passes only for a caller whose attribute has
//! that value, so it is filed under the first `eq` of each of its rules (by a hash of the value:
//! two values that collide only add a candidate); the others (a rule without `eq`, or no rules at
//! all) are candidates for every caller. The candidates are then decided as before: this narrows,
//! and never decides.

use std::hash::BuildHasher;

use super::Identity;
use super::decide::Lookup;
use crate::resource::template::Attribute;

/// Fixed seeds: the same value always files the same way.
const SEEDS: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7b07);

/// The identities filed under one attribute, sorted by the hash of the value their `eq` wants.
type Filed = Vec<(u64, Identity)>;

#[derive(Debug, Clone, Default)]
pub struct RuleIndex {
    by_eq: Vec<(Attribute, Filed)>,
    /// Identities a caller of any attributes might pass.
    always: Vec<Identity>,
}

impl RuleIndex {
    /// An index of `identities`.
    pub fn of<'a>(identities: impl IntoIterator<Item = &'a Identity>) -> RuleIndex {
        let mut index = RuleIndex::default();
        for identity in identities {
            let rules = &identity.spec.rules.allow;
            let first_eq = |rule: &'a crate::resource::workload_identity::AllowRule| {
                rule.conditions
                    .iter()
                    .find_map(|c| c.eq.as_ref().map(|eq| (&c.attribute, eq.value.as_str())))
            };
            if rules.is_empty() || !rules.iter().all(|rule| first_eq(rule).is_some()) {
                index.always.push(identity.clone());
                continue;
            }
            for (attribute, value) in rules.iter().filter_map(first_eq) {
                let at = match index.by_eq.iter().position(|(a, _)| a == attribute) {
                    Some(at) => at,
                    None => {
                        index.by_eq.push((attribute.clone(), Vec::new()));
                        index.by_eq.len() - 1
                    }
                };
                index.by_eq[at].1.push((SEEDS.hash_one(value), identity.clone()));
            }
        }
        for (_, filed) in &mut index.by_eq {
            filed.sort_unstable_by_key(|(hash, _)| *hash);
        }
        index
    }

    /// The identities a caller with `attributes` might pass, by name, each once.
    pub fn candidates(&self, attributes: &dyn Lookup) -> Vec<&Identity> {
        let mut out: Vec<&Identity> = self.always.iter().collect();
        for (attribute, filed) in &self.by_eq {
            for value in attributes.get(attribute).unwrap_or_default() {
                let hash = SEEDS.hash_one(value.as_str());
                let start = filed.partition_point(|(h, _)| *h < hash);
                out.extend(filed[start..].iter().take_while(|(h, _)| *h == hash).map(|(_, i)| i));
            }
        }
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out.dedup_by(|a, b| a.metadata.name == b.metadata.name);
        out
    }
}
