//! Unit tests of `decide`.

use super::*;
use crate::testing::examples::policy_from_text;

/// A policy where bot `b` may issue everything labelled `app: x`, plus the given identity spec.
fn policy(identity_spec: &str) -> Policy {
    policy_from_text(&format!(
        "
kind: cluster
version: v1
metadata: {{name: example.org}}
spec: {{}}
---
kind: role
version: v7
metadata: {{name: r}}
spec:
  allow:
    workload_identity_labels: {{app: x}}
    rules: [{{resources: [workload_identity], verbs: [read, list]}}]
---
kind: bot
version: v1
metadata: {{name: b}}
spec:
  roles: [r]
  traits: [{{name: team, values: [Blue, Red]}}]
---
kind: workload_identity
version: v1
metadata: {{name: wi, labels: {{app: x}}}}
spec:
{identity_spec}
"
    ))
}

fn workload(uid: u32) -> Attributes {
    let mut a = Attributes::new();
    a.set("workload.unix.attested", true)
        .set("workload.unix.uid", uid)
        .set("user.bot_name", "b")
        .set_many("user.traits.team", vec!["Blue".into(), "Red".into()]);
    a
}

fn with_rule(condition: &str) -> Policy {
    policy(&format!(
        "  rules: {{allow: [{{conditions: [{condition}]}}]}}\n  spiffe: {{id: '/u/{{{{workload.unix.uid}}}}'}}"
    ))
}

fn decide_uid(policy: &Policy, uid: u32) -> Result<Decision, String> {
    decide(policy, "b", "wi", &workload(uid)).map_err(|e| e.to_string())
}

#[test]
fn no_rules_allow_every_workload() {
    let p = policy("  spiffe: {id: /any}");
    assert_eq!(decide_uid(&p, 7).unwrap().spiffe_id, "spiffe://example.org/any");
}

#[test]
fn eq_allows_the_equal_value_and_refuses_others_saying_what_it_was() {
    let p = with_rule("{attribute: workload.unix.uid, eq: {value: '1000'}}");
    assert_eq!(decide_uid(&p, 1000).unwrap().spiffe_id, "spiffe://example.org/u/1000");
    let err = decide_uid(&p, 0).unwrap_err();
    assert!(err.contains("rule 1: `workload.unix.uid` is `0`, not `1000`"), "{err}");
}

#[test]
fn not_eq_refuses_the_excluded_value() {
    let p = with_rule("{attribute: workload.unix.uid, not_eq: {value: '0'}}");
    assert!(decide_uid(&p, 1000).is_ok());
    assert!(decide_uid(&p, 0).unwrap_err().contains("which `not_eq` excludes"));
}

#[test]
fn in_allows_any_listed_value() {
    let p = with_rule("{attribute: workload.unix.uid, in: {values: ['1000', '1001']}}");
    assert!(decide_uid(&p, 1001).is_ok());
    assert!(decide_uid(&p, 5).unwrap_err().contains("not one of [1000, 1001]"));
}

#[test]
fn not_in_refuses_any_listed_value() {
    let p = with_rule("{attribute: workload.unix.uid, not_in: {values: ['0', '1']}}");
    assert!(decide_uid(&p, 1000).is_ok());
    assert!(
        decide_uid(&p, 1)
            .unwrap_err()
            .contains("which `not_in` [0, 1] excludes")
    );
}

#[test]
fn an_unset_attribute_fails_its_condition_and_says_so() {
    let p = with_rule("{attribute: workload.systemd.service, eq: {value: web}}");
    let err = decide_uid(&p, 1000).unwrap_err();
    assert!(
        err.contains("`workload.systemd.service` is not set for this workload"),
        "{err}"
    );
}

#[test]
fn any_rule_may_allow_but_every_condition_of_that_rule_must_hold() {
    let p = policy(
        "  rules:
    allow:
      - conditions:
          - {attribute: workload.unix.uid, eq: {value: '1000'}}
          - {attribute: workload.unix.attested, eq: {value: 'false'}}
      - conditions:
          - {attribute: workload.unix.uid, eq: {value: '2000'}}
  spiffe: {id: /ok}",
    );
    let err = decide_uid(&p, 1000).unwrap_err();
    assert!(
        err.contains("rule 1: `workload.unix.attested`") && err.contains("rule 2:"),
        "{err}"
    );
    assert!(decide_uid(&p, 2000).is_ok());
}

#[test]
fn multi_valued_traits_match_conditions_on_any_value() {
    let p = with_rule("{attribute: user.traits.team, eq: {value: Red}}");
    assert!(decide_uid(&p, 1).is_ok());
}

#[test]
fn templates_render_attributes_through_lower_and_upper() {
    let p = policy(
        "  spiffe:
    id: /bot/{{strings.upper(user.bot_name)}}/{{workload.unix.uid}}
    hint: '{{ strings.lower(user.bot_name) }}-hint'
    x509:
      dns_sans: ['{{workload.unix.uid}}.example.org']
      subject_template: {common_name: '{{user.bot_name}}', organization: Example}
    jwt:
      extra_claims: {who: '{{user.bot_name}}', nested: {uid: '{{workload.unix.uid}}'}, n: 1}",
    );
    let d = decide_uid(&p, 42).unwrap();
    assert_eq!(d.spiffe_id, "spiffe://example.org/bot/B/42");
    assert_eq!(d.hint.as_deref(), Some("b-hint"));
    assert_eq!(d.dns_sans, ["42.example.org"]);
    assert_eq!(d.subject.common_name.as_deref(), Some("b"));
    assert_eq!(d.subject.organization.as_deref(), Some("Example"));
    assert_eq!(
        Value::Object(d.extra_claims),
        serde_json::json!({"who": "b", "nested": {"uid": "42"}, "n": 1})
    );
    // Parsed when the document was loaded, nested ones too: no issuance parses them.
    let parsed: Vec<&str> = p
        .identities
        .values()
        .next()
        .unwrap()
        .claim_templates()
        .iter()
        .map(|(text, _)| text.as_str())
        .collect();
    assert_eq!(parsed, ["{{user.bot_name}}", "{{workload.unix.uid}}"]);
}

#[test]
fn an_unset_template_attribute_refuses_naming_the_field_and_attribute() {
    let p = policy("  spiffe: {id: '/svc/{{workload.systemd.service}}'}");
    let err = decide_uid(&p, 1).unwrap_err();
    assert!(err.contains("`spiffe.id` cannot be rendered"), "{err}");
    assert!(err.contains("`workload.systemd.service` is not set"), "{err}");
}

#[test]
fn a_multi_valued_attribute_cannot_fill_a_template() {
    let p = policy("  spiffe: {id: '/team/{{user.traits.team}}'}");
    assert!(decide_uid(&p, 1).unwrap_err().contains("has 2 values"));
}

#[test]
fn a_rendered_id_that_breaks_the_spiffe_rules_is_refused() {
    let p = policy("  spiffe: {id: '/svc/{{workload.systemd.service}}'}");
    let mut attrs = workload(1);
    attrs.set("workload.systemd.service", "..");
    let err = decide(&p, "b", "wi", &attrs).unwrap_err().to_string();
    assert!(err.contains("is not valid"), "{err}");
}

#[test]
fn maximum_ttls_default_to_a_day_and_are_capped() {
    let d = decide_uid(&policy("  spiffe: {id: /a}"), 1).unwrap();
    assert_eq!(
        (d.x509_max_ttl, d.jwt_max_ttl),
        (DEFAULT_X509_MAX_TTL, DEFAULT_JWT_MAX_TTL)
    );
    let capped = policy("  spiffe: {id: /a, x509: {maximum_ttl: 9000h}, jwt: {maximum_ttl: 48h}}");
    let d = decide_uid(&capped, 1).unwrap();
    assert_eq!(
        (d.x509_max_ttl, d.jwt_max_ttl),
        (LIMIT_X509_MAX_TTL, DEFAULT_JWT_MAX_TTL)
    );
}

#[test]
fn an_unknown_bot_or_identity_is_named() {
    let p = policy("  spiffe: {id: /a}");
    assert!(
        decide(&p, "ghost", "wi", &workload(1))
            .unwrap_err()
            .to_string()
            .contains("bot `ghost`")
    );
    assert!(
        decide(&p, "b", "nope", &workload(1))
            .unwrap_err()
            .to_string()
            .contains("`nope` does not exist")
    );
}

#[test]
fn label_selectors_pick_only_identities_the_bot_may_issue() {
    let p = policy("  spiffe: {id: /a}");
    let picked = select(&p, "b", &[("app".to_owned(), "x".to_owned())].into(), &workload(1)).unwrap();
    assert_eq!(picked.len(), 1);
    let none = select(&p, "b", &[("app".to_owned(), "y".to_owned())].into(), &workload(1)).unwrap();
    assert!(none.is_empty());
}

/// The rule index only narrows: for callers of every kind, a label selection picks exactly what
/// testing each identity in turn picks.
#[test]
fn a_selection_through_the_rule_index_picks_what_testing_every_identity_picks() {
    let identities = [
        ("open", "{}"),
        (
            "uid-1",
            "{allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: '1'}}]}]}",
        ),
        (
            "uid-1-or-gid-5",
            "{allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: '1'}}]}, {conditions: [{attribute: workload.unix.gid, eq: {value: '5'}}]}]}",
        ),
        (
            "uid-2-twice",
            "{allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: '2'}}]}, {conditions: [{attribute: workload.unix.uid, eq: {value: '2'}}, {attribute: workload.unix.gid, eq: {value: '5'}}]}]}",
        ),
        (
            "not-root",
            "{allow: [{conditions: [{attribute: workload.unix.uid, not_eq: {value: '0'}}]}]}",
        ),
        (
            "in-then-eq",
            "{allow: [{conditions: [{attribute: workload.unix.uid, in: {values: ['1', '2']}}, {attribute: workload.unix.gid, eq: {value: '5'}}]}]}",
        ),
        (
            "eq-or-open-rule",
            "{allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: '9'}}]}, {conditions: [{attribute: workload.unix.attested, not_eq: {value: 'false'}}]}]}",
        ),
        (
            "team-red",
            "{allow: [{conditions: [{attribute: user.traits.team, eq: {value: Red}}]}]}",
        ),
        (
            "team-green",
            "{allow: [{conditions: [{attribute: user.traits.team, eq: {value: Green}}]}]}",
        ),
    ];
    let mut text = String::from(
        "kind: cluster\nversion: v1\nmetadata: {name: example.org}\nspec: {}\n---\nkind: role\nversion: v7\nmetadata: {name: r}\nspec:\n  allow:\n    workload_identity_labels: {app: x}\n    rules: [{resources: [workload_identity], verbs: [read, list]}]\n---\nkind: bot\nversion: v1\nmetadata: {name: b}\nspec:\n  roles: [r]\n  traits: [{name: team, values: [Blue, Red]}]\n",
    );
    for (name, rules) in identities {
        text.push_str(&format!(
            "---\nkind: workload_identity\nversion: v1\nmetadata: {{name: {name}, labels: {{app: x}}}}\nspec:\n  rules: {rules}\n  spiffe: {{id: /{name}}}\n"
        ));
    }
    let policy = policy_from_text(&text);
    let labels = BTreeMap::from([("app".to_owned(), "x".to_owned())]);
    let mut picked_any = 0;
    for (uid, gid) in [(0, 0), (1, 0), (2, 0), (2, 5), (9, 1), (3, 5), (1, 5)] {
        let mut attributes = workload(uid);
        attributes.set("workload.unix.gid", gid);
        let names = |decisions: Vec<Decision>| decisions.into_iter().map(|d| d.spiffe_id).collect::<Vec<_>>();
        let indexed = names(select(&policy, "b", &labels, &attributes).unwrap());
        let every: Vec<Decision> = policy
            .identities
            .keys()
            .filter_map(|name| decide(&policy, "b", name, &attributes).ok())
            .collect();
        assert_eq!(indexed, names(every), "uid {uid}, gid {gid}");
        picked_any += indexed.len();
    }
    assert!(picked_any > 7, "the callers pass more than the open identity");
}
