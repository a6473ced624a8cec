//! Where a decision reads attribute values. A test or `tbotctl` builds an [`Attributes`] map; the
//! issuer reads a caller's values where they already are ([`Caller`]): the workload's in the
//! request, the bot's in its document, the join's in the verified certificate. Nothing is copied
//! into a map for each issuance.

use std::sync::{LazyLock, OnceLock};

use super::{Attributes, Unrenderable};
use crate::issuer::bots::BotClaims;
use crate::resource::bot::Bot;
use crate::resource::template::Attribute;

/// The values of attributes, by their parsed name.
pub trait Lookup {
    fn get(&self, attribute: &Attribute) -> Option<&[String]>;

    /// The one value of an attribute, for templates: unset or several values is an error.
    fn single(&self, attribute: &Attribute) -> Result<&str, Unrenderable> {
        match self.get(attribute) {
            None | Some([]) => Err(Unrenderable::Unset(attribute.to_string())),
            Some([one]) => Ok(one),
            Some(many) => Err(Unrenderable::Several {
                attribute: attribute.to_string(),
                count: many.len(),
            }),
        }
    }
}

impl Lookup for Attributes {
    fn get(&self, attribute: &Attribute) -> Option<&[String]> {
        Attributes::get(self, attribute)
    }
}

/// `user.is_bot` of every caller the issuer decides for.
static IS_BOT: LazyLock<[String; 1]> = LazyLock::new(|| ["true".to_owned()]);

/// A caller of the issuer: a workload (its `workload.*` attributes, as its agent sent them and
/// the issuer checked them), its agent's bot (`user.*`, from the bot's document) and that bot's
/// join (`join.*`, from the verified certificate).
pub struct Caller<'a> {
    workload: &'a Attributes,
    claims: &'a BotClaims,
    /// The bot's document, if it still exists: its labels and traits.
    bot: Option<&'a Bot>,
    /// `user.name` (`bot-<name>`), made the first time a rule or template reads it.
    user_name: OnceLock<[String; 1]>,
}

impl<'a> Caller<'a> {
    pub fn new(workload: &'a Attributes, claims: &'a BotClaims, bot: Option<&'a Bot>) -> Caller<'a> {
        Caller {
            workload,
            claims,
            bot,
            user_name: OnceLock::new(),
        }
    }
}

impl Lookup for Caller<'_> {
    fn get(&self, attribute: &Attribute) -> Option<&[String]> {
        let one = std::slice::from_ref;
        match (attribute.base, attribute.key.as_deref()) {
            // Only `workload.*` comes from the request: an agent asserts nothing else.
            (base, _) if base.starts_with("workload.") => self.workload.get(attribute),
            ("user.name", None) => Some(
                self.user_name
                    .get_or_init(|| [format!("bot-{}", self.claims.bot)])
                    .as_slice(),
            ),
            ("user.bot_name", None) => Some(one(&self.claims.bot)),
            ("user.is_bot", None) => Some(IS_BOT.as_slice()),
            ("user.labels", Some(key)) => self.bot?.metadata.labels.get(key).map(one),
            // The last trait of a name, as a map built from them in order would hold.
            ("user.traits", Some(key)) => self
                .bot?
                .spec
                .traits
                .iter()
                .rev()
                .find(|t| t.name == key)
                .map(|t| t.values.as_slice()),
            (base, None) if base.starts_with("join.") => self.claims.join_attribute(base).map(one),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::bots::JoinClaims;
    use crate::testing::examples::policy_from_text;

    const POLICY: &str = "
kind: cluster
version: v1
metadata: {name: example.org}
spec: {}
---
kind: bot
version: v1
metadata: {name: web, labels: {env: prod, 'odd key': x}}
spec:
  roles: [r]
  traits:
    - {name: team, values: [a, b]}
    - {name: one, values: [x]}
    - {name: one, values: [y]}
    - {name: none, values: []}
";

    /// What the issuer built for each issuance before [`Caller`]: a map of the caller's
    /// `workload.*` attributes, then the bot's `user.*`, then its join's `join.*`.
    fn as_map(caller: &Caller<'_>) -> Attributes {
        let mut attrs = caller.workload.workload_only();
        attrs.set("user.name", format!("bot-{}", caller.claims.bot));
        attrs.set("user.bot_name", &caller.claims.bot);
        attrs.set("user.is_bot", true);
        if let Some(bot) = caller.bot {
            for (k, v) in &bot.metadata.labels {
                attrs.set(format!("user.labels.{k}"), v);
            }
            for t in &bot.spec.traits {
                attrs.set_many(format!("user.traits.{}", t.name), t.values.clone());
            }
        }
        caller.claims.add_join_attributes(&mut attrs);
        attrs
    }

    fn names() -> Vec<Attribute> {
        [
            "workload.unix.uid",
            "workload.unix.gid",
            "workload.kubernetes.labels.app",
            "workload.kubernetes.labels[\"a b\"]",
            "user.name",
            "user.bot_name",
            "user.is_bot",
            "user.labels.env",
            "user.labels.missing",
            "user.traits.team",
            "user.traits.one",
            "user.traits.none",
            "user.traits.missing",
            "join.meta.join_method",
            "join.meta.join_token_name",
            "join.iam.account",
            "join.iam.arn",
        ]
        .iter()
        .map(|n| Attribute::parse(n).unwrap())
        .collect()
    }

    fn claims(join: &[(&str, &str)]) -> BotClaims {
        BotClaims {
            bot: "web".into(),
            roles: vec!["r".into()],
            generation: 1,
            join: join
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<JoinClaims>(),
            instance: "i".into(),
        }
    }

    #[test]
    fn a_caller_reads_what_the_map_of_its_attributes_holds() {
        let policy = policy_from_text(POLICY);
        let mut workload = Attributes::new();
        workload
            .set("workload.unix.uid", 1000)
            .set("workload.kubernetes.labels.app", "web")
            .set("workload.kubernetes.labels[\"a b\"]", "c")
            // Not the agent's to assert: neither view reads it.
            .set("user.name", "bot-admin")
            .set("join.meta.join_method", "iam");
        let token = claims(&[
            ("join.meta.join_method", "token"),
            ("join.meta.join_token_name", "secret"),
        ]);
        let iam = claims(&[
            ("join.meta.join_method", "iam"),
            ("join.meta.join_token_name", "named"),
            ("join.iam.account", "123"),
            ("join.iam.arn", "arn:aws:sts::123:assumed-role/r/i"),
        ]);
        for claims in [&token, &iam] {
            for bot in [policy.bots.get("web"), None] {
                let caller = Caller::new(&workload, claims, bot);
                let map = as_map(&caller);
                for name in names() {
                    assert_eq!(caller.get(&name), map.get(&name), "{name}");
                    assert_eq!(caller.single(&name), map.single(&name), "{name}");
                }
            }
        }
        let caller = Caller::new(&workload, &token, policy.bots.get("web"));
        let read = |name: &str| caller.get(&Attribute::parse(name).unwrap()).map(<[String]>::to_vec);
        assert_eq!(read("user.name"), Some(vec!["bot-web".to_owned()]));
        assert_eq!(read("user.traits.one"), Some(vec!["y".to_owned()]));
        assert_eq!(read("join.meta.join_method"), Some(vec!["token".to_owned()]));
        // A token's name is its secret: never an attribute of a `token` join.
        assert_eq!(read("join.meta.join_token_name"), None);
        // A label whose key is not a name is read by its bracketed form (the map spelt it
        // `user.labels.odd key`, which no template can name, so it was never found).
        assert_eq!(read("user.labels[\"odd key\"]"), Some(vec!["x".to_owned()]));
    }
}
