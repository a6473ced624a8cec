//! Role-based access: may this bot issue this `workload_identity`? One of its roles must allow it
//! (labels match and a rule grants `read` and `list` on `workload_identity`) and none may deny it.

use std::collections::BTreeMap;

use crate::issuer::policy::Policy;
use crate::resource::bot::Bot;
use crate::resource::role::{LabelValues, Role, RoleConditions, Verb};
use crate::resource::workload_identity::WorkloadIdentity;

/// Whether `labels` (a role's `workload_identity_labels`) select an identity with `actual` labels.
/// Every key must be present with one of the listed values; `*` as key and value matches everything,
/// `*` as a value matches any value. An empty selector matches nothing.
pub fn labels_match(labels: &BTreeMap<String, LabelValues>, actual: &BTreeMap<String, String>) -> bool {
    if labels.is_empty() {
        return false;
    }
    labels.iter().all(|(key, values)| {
        let values: &[String] = match values {
            LabelValues::One(v) => std::slice::from_ref(v),
            LabelValues::Many(vs) => vs,
        };
        if key == "*" {
            return values.iter().any(|v| v == "*");
        }
        actual
            .get(key)
            .is_some_and(|have| values.iter().any(|v| v == "*" || v == have))
    })
}

fn covers_workload_identity(resources: &[String]) -> bool {
    resources.iter().any(|r| r == "workload_identity" || r == "*")
}

/// Whether a role side grants both `read` and `list` on `workload_identity`.
fn grants_read_list(conditions: &RoleConditions) -> bool {
    let has = |verb| {
        conditions
            .rules
            .iter()
            .filter(|rule| covers_workload_identity(&rule.resources))
            .flat_map(|rule| rule.verbs.iter())
            .any(|v| *v == verb || *v == Verb::All)
    };
    has(Verb::Read) && has(Verb::List)
}

/// Whether a role side's rules name `read` or `list` on `workload_identity` (for `deny`).
fn names_read_or_list(conditions: &RoleConditions) -> bool {
    conditions
        .rules
        .iter()
        .filter(|rule| covers_workload_identity(&rule.resources))
        .flat_map(|rule| rule.verbs.iter())
        .any(|v| matches!(v, Verb::Read | Verb::List | Verb::All))
}

fn denies(role: &Role, identity: &WorkloadIdentity) -> Option<String> {
    let deny = &role.spec.deny;
    if labels_match(&deny.workload_identity_labels, &identity.metadata.labels) {
        return Some("its `deny.workload_identity_labels` match the identity's labels".into());
    }
    if names_read_or_list(deny) {
        return Some("its `deny.rules` take `read`/`list` on `workload_identity`".into());
    }
    None
}

fn why_not_allowed(role: &Role, identity: &WorkloadIdentity) -> Option<String> {
    let allow = &role.spec.allow;
    if !labels_match(&allow.workload_identity_labels, &identity.metadata.labels) {
        return Some(if allow.workload_identity_labels.is_empty() {
            "it sets no `allow.workload_identity_labels`".to_owned()
        } else {
            format!(
                "its `allow.workload_identity_labels` {} do not match the identity's labels {}",
                render_selector(&allow.workload_identity_labels),
                render_labels(&identity.metadata.labels)
            )
        });
    }
    if !grants_read_list(allow) {
        return Some("its `allow.rules` do not grant both `read` and `list` on `workload_identity`".into());
    }
    None
}

/// Why a bot may not issue an identity: a sentence naming every role and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bot `{bot}` may not issue workload_identity `{identity}`: {why}")]
pub struct RbacDenial {
    pub bot: String,
    pub identity: String,
    pub why: RbacReason,
}

/// What in the bot's roles refuses the identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacReason {
    #[error("the bot has no roles")]
    NoRoles,
    #[error("role `{role}` denies it: {why}")]
    Denied { role: String, why: String },
    /// One reason per role.
    #[error("no role allows it ({})", .0.join("; "))]
    NotAllowed(Vec<String>),
}

/// Decides whether `bot` may issue `identity`; the error is a sentence naming every role and why.
pub fn may_issue(policy: &Policy, bot: &Bot, identity: &WorkloadIdentity) -> Result<(), RbacDenial> {
    let refuse = |why| RbacDenial {
        bot: bot.metadata.name.to_string(),
        identity: identity.metadata.name.to_string(),
        why,
    };
    if bot.spec.roles.is_empty() {
        return Err(refuse(RbacReason::NoRoles));
    }
    let mut reasons = Vec::new();
    let mut allowed = false;
    for name in &bot.spec.roles {
        let Some(role) = policy.roles.get(&**name) else {
            reasons.push(format!("role `{}` does not exist", name));
            continue;
        };
        if let Some(why) = denies(role, identity) {
            let role = name.to_string();
            return Err(refuse(RbacReason::Denied { role, why }));
        }
        match why_not_allowed(role, identity) {
            None => allowed = true,
            Some(why) => reasons.push(format!("role `{}`: {why}", name)),
        }
    }
    if allowed {
        Ok(())
    } else {
        Err(refuse(RbacReason::NotAllowed(reasons)))
    }
}

fn render_selector(labels: &BTreeMap<String, LabelValues>) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| match v {
            LabelValues::One(v) => format!("{k}: {v}"),
            LabelValues::Many(vs) => format!("{k}: [{}]", vs.join(", ")),
        })
        .collect();
    format!("{{{}}}", pairs.join(", "))
}

fn render_labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

impl crate::error::Explain for RbacDenial {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        "give the bot a role whose `allow.workload_identity_labels` match the identity's labels and whose `allow.rules` grant `read` and `list` on `workload_identity`".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::examples::policy_from_text;

    const BASE: &str = "
kind: cluster
version: v1
metadata: {name: example.org}
spec: {}
---
kind: workload_identity
version: v1
metadata: {name: web, labels: {env: prod, team: web}}
spec: {spiffe: {id: /web}}
";

    fn check(roles: &str, bot_roles: &[&str]) -> Result<(), String> {
        let bot = format!(
            "---\nkind: bot\nversion: v1\nmetadata: {{name: b}}\nspec: {{roles: [{}]}}\n",
            bot_roles.join(", ")
        );
        let policy = policy_from_text(&format!("{BASE}{roles}{bot}"));
        may_issue(&policy, &policy.bots["b"], &policy.identities["web"]).map_err(|e| e.to_string())
    }

    fn role(name: &str, body: &str) -> String {
        format!("---\nkind: role\nversion: v7\nmetadata: {{name: {name}}}\nspec:\n{body}\n")
    }

    const GRANT: &str = "    rules: [{resources: [workload_identity], verbs: [read, list]}]";

    #[test]
    fn a_role_whose_labels_match_and_that_grants_read_and_list_allows() {
        let r = role(
            "ok",
            &format!("  allow:\n    workload_identity_labels: {{env: prod}}\n{GRANT}"),
        );
        assert_eq!(check(&r, &["ok"]), Ok(()));
    }

    #[test]
    fn a_list_of_label_values_matches_any_of_them() {
        let r = role(
            "ok",
            &format!("  allow:\n    workload_identity_labels: {{env: [dev, prod]}}\n{GRANT}"),
        );
        assert_eq!(check(&r, &["ok"]), Ok(()));
    }

    #[test]
    fn wildcard_labels_match_every_identity() {
        let r = role(
            "all",
            &format!("  allow:\n    workload_identity_labels: {{'*': '*'}}\n{GRANT}"),
        );
        assert_eq!(check(&r, &["all"]), Ok(()));
    }

    #[test]
    fn labels_that_do_not_match_refuse_naming_the_role_and_both_label_sets() {
        let r = role(
            "dev",
            &format!("  allow:\n    workload_identity_labels: {{env: dev}}\n{GRANT}"),
        );
        let err = check(&r, &["dev"]).unwrap_err();
        assert!(err.contains("role `dev`"), "{err}");
        assert!(
            err.contains("{env: dev}") && err.contains("{env: prod, team: web}"),
            "{err}"
        );
    }

    #[test]
    fn a_role_granting_only_read_allows_nothing() {
        let r = role(
            "ro",
            "  allow:\n    workload_identity_labels: {env: prod}\n    rules: [{resources: [workload_identity], verbs: [read]}]",
        );
        let err = check(&r, &["ro"]).unwrap_err();
        assert!(err.contains("do not grant both `read` and `list`"), "{err}");
    }

    #[test]
    fn rules_on_other_resources_grant_nothing_but_star_grants_everything() {
        let other = role(
            "other",
            "  allow:\n    workload_identity_labels: {env: prod}\n    rules: [{resources: [node], verbs: ['*']}]",
        );
        assert!(check(&other, &["other"]).is_err());
        let star = role(
            "star",
            "  allow:\n    workload_identity_labels: {env: prod}\n    rules: [{resources: ['*'], verbs: ['*']}]",
        );
        assert_eq!(check(&star, &["star"]), Ok(()));
    }

    #[test]
    fn a_deny_by_labels_wins_over_another_role_that_allows() {
        let allow = role(
            "ok",
            &format!("  allow:\n    workload_identity_labels: {{env: prod}}\n{GRANT}"),
        );
        let deny = role("no-web", "  deny:\n    workload_identity_labels: {team: web}");
        let err = check(&format!("{allow}{deny}"), &["ok", "no-web"]).unwrap_err();
        assert!(err.contains("role `no-web` denies it"), "{err}");
    }

    #[test]
    fn a_deny_rule_on_read_refuses_every_identity() {
        let allow = role(
            "ok",
            &format!("  allow:\n    workload_identity_labels: {{env: prod}}\n{GRANT}"),
        );
        let deny = role(
            "no-read",
            "  deny:\n    rules: [{resources: [workload_identity], verbs: [read]}]",
        );
        let err = check(&format!("{allow}{deny}"), &["ok", "no-read"]).unwrap_err();
        assert!(err.contains("`deny.rules`"), "{err}");
    }

    #[test]
    fn a_missing_role_is_named_in_the_refusal() {
        let err = check("", &["ghost"]).unwrap_err();
        assert!(err.contains("role `ghost` does not exist"), "{err}");
    }

    #[test]
    fn one_allowing_role_is_enough() {
        let dev = role(
            "dev",
            &format!("  allow:\n    workload_identity_labels: {{env: dev}}\n{GRANT}"),
        );
        let prod = role(
            "prod",
            &format!("  allow:\n    workload_identity_labels: {{env: prod}}\n{GRANT}"),
        );
        assert_eq!(check(&format!("{dev}{prod}"), &["dev", "prod"]), Ok(()));
    }
}
