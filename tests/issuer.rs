//! The issuer as the agent sees it: token joins, renewals, X509-SVIDs and JWT-SVIDs checked by
//! independent parsers (`x509-parser`, `openssl`, `jsonwebtoken`), restarts and CA rotation.

mod common;

use common::{renewal, token_join};

use std::path::Path;
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use tbot::error::Explain;
use tbot::issuer::{Attributes, IdentitySelector, Issuer, IssuerError, JwtRequest, LocalIssuer, X509Request};
use tbot::store::Store;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

const HOUR: Duration = Duration::from_secs(3600);

fn docs(cluster_spec: &str, extra: &str) -> String {
    format!(
        "
kind: cluster
version: v1
metadata: {{name: example.org}}
spec: {cluster_spec}
---
kind: role
version: v7
metadata: {{name: issuer}}
spec:
  allow:
    workload_identity_labels: {{app: web}}
    rules: [{{resources: [workload_identity], verbs: [read, list]}}]
---
kind: bot
version: v1
metadata: {{name: web-bot}}
spec: {{roles: [issuer]}}
---
kind: token
version: v2
metadata: {{name: secret-token-1}}
spec: {{roles: [Bot], join_method: token, bot_name: web-bot}}
---
kind: workload_identity
version: v1
metadata: {{name: web, labels: {{app: web}}}}
spec:
  rules:
    allow:
      - conditions: [{{attribute: workload.unix.uid, eq: {{value: '1000'}}}}]
  spiffe:
    id: '/svc/{{{{workload.unix.uid}}}}'
    hint: web
    x509:
      dns_sans: [web.example.org]
      subject_template: {{organization: Example}}
    jwt:
      extra_claims: {{bot: '{{{{user.bot_name}}}}'}}
{extra}"
    )
}

async fn open(dir: &Path, text: &str) -> LocalIssuer {
    LocalIssuer::open(Store::open(dir).unwrap(), common::policy(text))
        .await
        .unwrap()
}

fn workload(uid: u32) -> Attributes {
    let mut a = Attributes::new();
    a.set("workload.unix.uid", uid);
    a
}

fn x509_request(bot_cert: &[u8], key: &KeyPair, uid: u32) -> X509Request {
    X509Request {
        bot_certificate: bot_cert.to_vec(),
        identity: "web".into(),
        workload: workload(uid),
        public_key: key.subject_public_key_info(),
        ttl: HOUR,
    }
}

/// Checks an X509-SVID against every X509-SVID rule of the SPIFFE standard with x509-parser, then the chain and the key
/// match with the `openssl` command.
fn check_x509_svid(leaf: &[u8], key: &KeyPair, bundle: &[Vec<u8>], spiffe_id: &str) {
    let (rest, cert) = parse_x509_certificate(leaf).expect("the leaf parses");
    assert!(rest.is_empty());
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info(),
        "the certificate certifies the key sent, byte for byte"
    );
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [spiffe_id], "exactly one URI SAN");
    let bc = cert.basic_constraints().unwrap().expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf cA=false");
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(cert.tbs_certificate.raw_serial().len() >= 16, "a 128-bit serial");
    let now = ::time::OffsetDateTime::now_utc();
    let not_before = cert.validity().not_before.to_datetime();
    assert!(not_before <= now - ::time::Duration::seconds(55) && not_before > now - ::time::Duration::minutes(2));
    for ext in cert.extensions() {
        if let ParsedExtension::UnsupportedExtension { .. } = ext.parsed_extension() {
            panic!("unexpected extension {}", ext.oid);
        }
    }
    // Chain and key, by openssl.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("bundle.pem");
    let bundle_pem: String = bundle.iter().map(|der| common::pem("CERTIFICATE", der)).collect();
    std::fs::write(&ca_file, bundle_pem).unwrap();
    let leaf_file = dir.path().join("leaf.pem");
    std::fs::write(&leaf_file, common::pem("CERTIFICATE", leaf)).unwrap();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, common::pem("PRIVATE KEY", &key.serialize_der())).unwrap();
    let verified = common::openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslclient",
        "-CAfile",
        ca_file.to_str().unwrap(),
        leaf_file.to_str().unwrap(),
    ]);
    assert!(verified.contains(": OK"), "{verified}");
    let from_key = common::openssl(&["pkey", "-in", key_file.to_str().unwrap(), "-pubout"]);
    let from_cert = common::openssl(&["x509", "-in", leaf_file.to_str().unwrap(), "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert, "the private key matches the leaf");
}

#[tokio::test]
async fn a_token_join_gives_a_bot_certificate_naming_the_bot_and_its_join() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&key, "secret-token-1")).await.unwrap();
    assert_eq!(bot.bot, "web-bot");
    assert_eq!(bot.roles, ["issuer"]);
    assert_eq!(bot.generation, 1);
    let (_, cert) = parse_x509_certificate(&bot.der).unwrap();
    assert_eq!(
        cert.subject().iter_common_name().next().unwrap().as_str().unwrap(),
        "web-bot"
    );
    let ttl = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(ttl, 3600 + 60, "credential_ttl plus the minute of backdating");
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
}

#[tokio::test]
async fn a_token_is_single_use_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let other = KeyPair::generate().unwrap();
    {
        let issuer = open(dir.path(), &docs("{}", "")).await;
        issuer.join(token_join(&key, "secret-token-1")).await.unwrap();
        let err = issuer.join(token_join(&other, "secret-token-1")).await.unwrap_err();
        assert!(err.to_string().contains("already used by bot `web-bot`"), "{err}");
        assert!(!err.is_transient());
    }
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let err = issuer.join(token_join(&other, "secret-token-1")).await.unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
}

#[tokio::test]
async fn a_join_retried_with_the_same_key_after_a_lost_answer_succeeds_until_the_bot_renews() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    {
        let issuer = open(dir.path(), &docs("{}", "")).await;
        issuer.join(token_join(&key, "secret-token-1")).await.unwrap();
    }
    // The joiner crashed before saving its certificate; after a restart it asks again with the
    // key it saved before the call, and gets a certificate for that key.
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let again = issuer.join(token_join(&key, "secret-token-1")).await.unwrap();
    // Once the bot has renewed, the join cannot be replayed, even with that key.
    let next = KeyPair::generate().unwrap();
    issuer.renew(renewal(&again.der, &key, &next)).await.unwrap();
    let err = issuer.join(token_join(&key, "secret-token-1")).await.unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
}

#[tokio::test]
async fn refusals_say_which_check_failed_without_echoing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let expired = "---
kind: token
version: v2
metadata: {name: old-token, expires: '2020-01-01T00:00:00Z'}
spec: {roles: [Bot], join_method: token, bot_name: web-bot}
";
    let issuer = open(dir.path(), &docs("{}", expired)).await;
    let key = KeyPair::generate().unwrap();
    let err = issuer.join(token_join(&key, "old-token")).await.unwrap_err();
    assert!(
        err.to_string().contains("the token expired at 2020-01-01T00:00:00Z"),
        "{err}"
    );
    let err = issuer.join(token_join(&key, "guessed-secret")).await.unwrap_err();
    assert!(err.to_string().contains("no token by that name exists"), "{err}");
    assert!(!err.to_string().contains("guessed-secret"), "{err}");
}

#[tokio::test]
async fn x509_svids_meet_every_spiffe_rule_and_verify_against_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let svid = issuer.issue_x509(x509_request(&bot.der, &key, 1000)).await.unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/svc/1000");
    assert_eq!(svid.hint.as_deref(), Some("web"));
    let bundle = issuer.current_bundles();
    assert_eq!(bundle.trust_domain, "example.org");
    check_x509_svid(
        &svid.certificate,
        &key,
        &bundle.x509_authorities,
        "spiffe://example.org/svc/1000",
    );
    let text = common::openssl(&["x509", "-inform", "DER", "-noout", "-text", "-in", &{
        let f = dir.path().join("leaf.der");
        std::fs::write(&f, &svid.certificate).unwrap();
        f.to_str().unwrap().to_owned()
    }]);
    assert!(text.contains("DNS:web.example.org"), "{text}");
    assert!(text.contains("O=Example") || text.contains("O = Example"), "{text}");
    // The CA certificate itself.
    let (_, ca) = parse_x509_certificate(&bundle.x509_authorities[0]).unwrap();
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let san = ca.subject_alternative_name().unwrap().unwrap();
    assert!(matches!(
        san.value.general_names[..],
        [GeneralName::URI("spiffe://example.org")]
    ));
}

#[tokio::test]
async fn a_workload_the_rules_do_not_allow_gets_nothing_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let err = issuer.issue_x509(x509_request(&bot.der, &key, 0)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Denied(_)));
    assert!(
        err.to_string().contains("`workload.unix.uid` is `0`, not `1000`"),
        "{err}"
    );
    // The agent cannot claim the bot's attributes for the workload: `user.*` comes from the bot, and
    // a request that sends one is refused, naming it.
    let mut forged = workload(1000);
    forged.set("user.bot_name", "someone-else");
    let refused = issuer
        .resolve(&bot.der, &IdentitySelector::Name("web".into()), &forged)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("`user.bot_name`"), "{refused}");
    let names = issuer
        .resolve(&bot.der, &IdentitySelector::Name("web".into()), &workload(1000))
        .await
        .unwrap();
    assert_eq!(names.decided_on.as_deref(), Some(&["workload.unix.uid".to_owned()][..]));
    let names = names.identities;
    assert_eq!(names.len(), 1);
    assert_eq!(names[0].name, "web");
    assert_eq!(names[0].reads, ["workload.unix.uid"]);
    let jwt = issuer
        .issue_jwt(JwtRequest {
            bot_certificate: bot.der.clone(),
            identity: "web".into(),
            workload: workload(1000),
            audience: vec!["a".into()],
            ttl: HOUR,
        })
        .await
        .unwrap();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&jwt.token)
        .unwrap()
        .claims;
    assert_eq!(claims["bot"], "web-bot", "the extra claim reads the real bot name");
}

#[tokio::test]
async fn ttls_are_capped_by_the_identity_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let text = docs("{}", "").replace("subject_template:", "maximum_ttl: 10m\n      subject_template:");
    let issuer = open(dir.path(), &text).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let svid = issuer.issue_x509(x509_request(&bot.der, &key, 1000)).await.unwrap();
    let (_, cert) = parse_x509_certificate(&svid.certificate).unwrap();
    let ttl = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(ttl, 600 + 60);
}

#[tokio::test]
async fn jwt_svids_verify_against_the_jwks_with_an_independent_library() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{jwt: {issuer: 'https://issuer.example.org'}}", "")).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let svid = issuer
        .issue_jwt(JwtRequest {
            bot_certificate: bot.der.clone(),
            identity: "web".into(),
            workload: workload(1000),
            audience: vec!["payments".into()],
            ttl: HOUR,
        })
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(&svid.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.expect("kid is always set");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(issuer.current_bundles().jwks()).unwrap();
    let jwk = jwks.find(&kid).expect("the kid is in the JWKS");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["payments"]);
    validation.set_issuer(&["https://issuer.example.org"]);
    validation.set_required_spec_claims(&["sub", "aud", "exp", "iat"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &svid.token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .unwrap();
    let claims = data.claims;
    assert_eq!(claims["sub"], "spiffe://example.org/svc/1000");
    assert_eq!(claims["bot"], "web-bot");
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 32));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
    // A JWT bundle holds no X.509 CA keys: every key is an EC signing key with a kid.
    for key in &jwks.keys {
        assert!(key.common.key_id.is_some());
        assert!(key.common.x509_chain.is_none());
    }
    let err = issuer
        .issue_jwt(JwtRequest {
            bot_certificate: bot.der,
            identity: "web".into(),
            workload: workload(1000),
            audience: vec![],
            ttl: HOUR,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("audience"), "{err}");
}

#[tokio::test]
async fn renewals_move_the_generation_and_a_copied_identity_locks_the_bot() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let k1 = KeyPair::generate().unwrap();
    let first = issuer.join(token_join(&k1, "secret-token-1")).await.unwrap();
    let k2 = KeyPair::generate().unwrap();
    let second = issuer.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
    assert_eq!(second.generation, 2);
    // The certificate just replaced still issues for a moment (the agent switches a little after
    // the issuer moved on); once another renewal replaced it too, it issues no more.
    let key = KeyPair::generate().unwrap();
    issuer
        .issue_x509(x509_request(&first.der, &key, 1000))
        .await
        .expect("the replaced generation issues during its grace");
    let k3 = KeyPair::generate().unwrap();
    let third = issuer.renew(renewal(&second.der, &k2, &k3)).await.unwrap();
    let err = issuer
        .issue_x509(x509_request(&first.der, &key, 1000))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("renewed since"), "{err}");
    let second = third;
    let k2 = k3;
    // A renewal signed with another key is refused without locking.
    let stranger = KeyPair::generate().unwrap();
    let err = issuer.renew(renewal(&second.der, &stranger, &k2)).await.unwrap_err();
    assert!(
        err.to_string().contains("not signed with the certificate's key"),
        "{err}"
    );
    // Someone renews with the stale copy (and a key of their own): the bot is locked, for everyone.
    let copier = KeyPair::generate().unwrap();
    let err = issuer.renew(renewal(&first.der, &k1, &copier)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("two holders share one identity"), "{err}");
    let err = issuer
        .issue_x509(x509_request(&second.der, &key, 1000))
        .await
        .unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
    drop(issuer);
    // The lock and generation survive a restart.
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let err = issuer.renew(renewal(&second.der, &k2, &k1)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn a_restarted_issuer_keeps_its_ca_jwt_key_and_generations() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, renewed, k2) = {
        let issuer = open(dir.path(), &docs("{}", "")).await;
        let k1 = KeyPair::generate().unwrap();
        let first = issuer.join(token_join(&k1, "secret-token-1")).await.unwrap();
        let k2 = KeyPair::generate().unwrap();
        let renewed = issuer.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
        (issuer.current_bundles(), renewed, k2)
    };
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let again = issuer.current_bundles();
    assert_eq!(again.x509_authorities, bundle.x509_authorities);
    assert_eq!(again.jwks(), bundle.jwks());
    let key = KeyPair::generate().unwrap();
    issuer
        .issue_x509(x509_request(&renewed.der, &key, 1000))
        .await
        .expect("the renewed certificate still works after a restart");
    let k3 = KeyPair::generate().unwrap();
    assert_eq!(
        issuer.renew(renewal(&renewed.der, &k2, &k3)).await.unwrap().generation,
        3
    );
    let mode = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.path().join("issuer/example.org").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca-1.key"), 0o600);
    assert_eq!(mode("jwt-1.key"), 0o600);
}

#[tokio::test]
async fn a_second_issuer_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), &docs("{}", "")).await;
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("in use by another tbot"), "{err}");
}

#[tokio::test]
async fn ca_rotation_keeps_both_cas_in_the_bundle_until_old_svids_expire() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let mut bundles = issuer.bundles();
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let old_key = KeyPair::generate().unwrap();
    let old = issuer.issue_x509(x509_request(&bot.der, &old_key, 1000)).await.unwrap();
    // Prepared, then activated at once (`tbotctl rotate ca`, then `--force`).
    use tbot::issuer::keys::rotation::ByHand;
    let rotate = |force| ByHand::Rotate {
        grace: Duration::ZERO,
        force,
    };
    issuer.rotate_by_hand(false, rotate(false)).await.unwrap();
    issuer.rotate_by_hand(false, rotate(true)).await.unwrap();
    assert!(bundles.has_changed().unwrap(), "watchers see the rotation");
    let bundle = bundles.borrow_and_update().clone();
    assert_eq!(bundle.x509_authorities.len(), 2);
    let new_key = KeyPair::generate().unwrap();
    // The bot certificate signed by the old CA still works during the overlap.
    let new = issuer.issue_x509(x509_request(&bot.der, &new_key, 1000)).await.unwrap();
    let issuer_of = |der: &[u8]| {
        let (_, c) = parse_x509_certificate(der).unwrap();
        c.issuer().to_string()
    };
    assert_ne!(issuer_of(&old.certificate), issuer_of(&new.certificate));
    check_x509_svid(&old.certificate, &old_key, &bundle.x509_authorities, &old.spiffe_id);
    check_x509_svid(&new.certificate, &new_key, &bundle.x509_authorities, &new.spiffe_id);
    issuer.prune().await.unwrap();
    assert_eq!(
        issuer.current_bundles().x509_authorities.len(),
        2,
        "the old CA stays while its SVIDs live"
    );
    drop(issuer);
    let issuer = open(dir.path(), &docs("{}", "")).await;
    assert_eq!(issuer.current_bundles().x509_authorities, bundle.x509_authorities);
}

#[tokio::test]
async fn rsa_and_ed25519_cas_sign_svids_that_openssl_verifies() {
    for algorithm in ["rsa-2048", "ed25519"] {
        let dir = tempfile::tempdir().unwrap();
        let issuer = open(
            dir.path(),
            &docs(&format!("{{ca: {{key_algorithm: {algorithm}}}}}"), ""),
        )
        .await;
        let bot_key = KeyPair::generate().unwrap();
        let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
        let key = KeyPair::generate().unwrap();
        let svid = issuer.issue_x509(x509_request(&bot.der, &key, 1000)).await.unwrap();
        check_x509_svid(
            &svid.certificate,
            &key,
            &issuer.current_bundles().x509_authorities,
            &svid.spiffe_id,
        );
        drop(issuer);
        let issuer = open(
            dir.path(),
            &docs(&format!("{{ca: {{key_algorithm: {algorithm}}}}}"), ""),
        )
        .await;
        let svid = issuer.issue_x509(x509_request(&bot.der, &key, 1000)).await;
        assert!(svid.is_ok(), "{algorithm} after a restart: {svid:?}");
    }
}

#[tokio::test]
async fn label_selectors_resolve_to_the_identities_the_caller_may_have() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let selector = IdentitySelector::Labels([("app".to_owned(), "web".to_owned())].into());
    let resolved = issuer.resolve(&bot.der, &selector, &workload(1000)).await.unwrap();
    let names: Vec<&str> = resolved.identities.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    // The rules of every identity the labels could pick decide: their attributes, no more.
    assert_eq!(
        resolved.decided_on.as_deref(),
        Some(&["workload.unix.uid".to_owned()][..])
    );
    assert!(
        issuer
            .resolve(&bot.der, &selector, &workload(1))
            .await
            .unwrap()
            .identities
            .is_empty()
    );
}

#[tokio::test]
async fn a_renewal_retried_after_a_lost_answer_signs_the_same_generation_instead_of_locking() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let k1 = KeyPair::generate().unwrap();
    let first = issuer.join(token_join(&k1, "secret-token-1")).await.unwrap();
    let k2 = KeyPair::generate().unwrap();
    let lost = issuer.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
    assert_eq!(lost.generation, 2);
    // The agent crashed before saving generation 2; it retries with the same pending key.
    let again = issuer
        .renew(renewal(&first.der, &k1, &k2))
        .await
        .expect("not a copy: the same new key");
    assert_eq!(again.generation, 2);
    let key = KeyPair::generate().unwrap();
    issuer
        .issue_x509(x509_request(&again.der, &key, 1000))
        .await
        .expect("the re-signed certificate works");
    // A stale copy asking for another key is still caught.
    let k3 = KeyPair::generate().unwrap();
    let err = issuer.renew(renewal(&first.der, &k1, &k3)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn each_join_of_one_bot_is_its_own_instance_and_a_copy_locks_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let second_token = "\n---\nkind: token\nversion: v2\nmetadata: {name: secret-token-2}\n\
                        spec: {roles: [Bot], join_method: token, bot_name: web-bot}\n";
    let issuer = open(dir.path(), &docs("{}", second_token)).await;
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let a = issuer.join(token_join(&ka, "secret-token-1")).await.unwrap();
    let b = issuer.join(token_join(&kb, "secret-token-2")).await.unwrap();
    assert_eq!((a.bot.as_str(), b.bot.as_str()), ("web-bot", "web-bot"));
    assert_ne!(a.instance, b.instance, "two joins, two instances");
    // They renew side by side, each with its own generation.
    let (ka2, kb2) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let a2 = issuer.renew(renewal(&a.der, &ka, &ka2)).await.unwrap();
    let b2 = issuer.renew(renewal(&b.der, &kb, &kb2)).await.unwrap();
    assert_eq!((a2.generation, b2.generation), (2, 2));
    assert_eq!(
        (a2.instance.as_str(), b2.instance.as_str()),
        (a.instance.as_str(), b.instance.as_str())
    );
    // A stale copy of A's first certificate renews: A is locked, B goes on.
    let copier = KeyPair::generate().unwrap();
    let ka3 = KeyPair::generate().unwrap();
    issuer.renew(renewal(&a2.der, &ka2, &ka3)).await.unwrap();
    let err = issuer.renew(renewal(&a.der, &ka, &copier)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
    let key = KeyPair::generate().unwrap();
    issuer
        .issue_x509(x509_request(&b2.der, &key, 1000))
        .await
        .expect("the other instance still issues");
    let kb3 = KeyPair::generate().unwrap();
    issuer.renew(renewal(&b2.der, &kb2, &kb3)).await.expect("and renews");
    // The ledger lists both, one locked.
    let instances = issuer.instances(Some("web-bot"));
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert_eq!(instances.iter().filter(|(_, r)| r.locked.is_some()).count(), 1);
}

/// Over the issuer API: a copy of an instance's old certificate renews, the instance is locked,
/// and the `Watch` stream the real holder has open ends with the lock's reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_renewing_over_the_network_locks_the_instance_and_ends_its_open_watch() {
    use tbot::agent::remote::RemoteIssuer;
    let issuer = std::sync::Arc::new(
        LocalIssuer::open(Store::memory(), common::policy(&docs("{}", "")))
            .await
            .unwrap(),
    );
    let (settings, _stop) = over_the_network(&issuer).await;
    // The holder joins, renews once, and watches with its current certificate.
    let holder = RemoteIssuer::new(settings.clone(), Store::memory(), &Default::default()).unwrap();
    let k1 = KeyPair::generate().unwrap();
    let first = holder.join(token_join(&k1, "secret-token-1")).await.unwrap();
    holder.present(&first.der, &k1.serialize_der());
    let k2 = KeyPair::generate().unwrap();
    let second = holder.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
    holder.present(&second.der, &k2.serialize_der());
    holder.follow();
    let mut link = holder.link();
    tokio::time::timeout(Duration::from_secs(10), link.wait_for(|l| l.connected))
        .await
        .expect("the holder's Watch stream is up")
        .unwrap();
    // A copy of the first certificate renews from elsewhere.
    let copy = RemoteIssuer::new(settings, Store::memory(), &Default::default()).unwrap();
    copy.present(&first.der, &k1.serialize_der());
    let stranger = KeyPair::generate().unwrap();
    let err = copy.renew(renewal(&first.der, &k1, &stranger)).await.unwrap_err();
    assert!(matches!(err, IssuerError::Locked { .. }), "{err}");
    // The holder's open stream ends, saying why.
    let ended = tokio::time::timeout(Duration::from_secs(10), link.wait_for(|l| !l.connected))
        .await
        .expect("the locked instance's stream ends")
        .unwrap()
        .clone();
    assert!(ended.message.contains("locked"), "{ended:?}");
}

/// Over the issuer API: a renewal gives the client a new certificate, and its `Watch` stream moves
/// to it at once (not after the 0–5 s spread that follows a dropped connection), so a policy change
/// made just after a renewal still arrives promptly.
#[tokio::test(flavor = "multi_thread")]
async fn the_watch_stream_moves_to_a_renewed_certificate_at_once() {
    use tbot::agent::remote::RemoteIssuer;
    let issuer = std::sync::Arc::new(
        LocalIssuer::open(Store::memory(), common::policy(&docs("{}", "")))
            .await
            .unwrap(),
    );
    let (settings, _stop) = over_the_network(&issuer).await;
    let client = RemoteIssuer::new(settings, Store::memory(), &Default::default()).unwrap();
    let mut key = KeyPair::generate().unwrap();
    let mut cert = client.join(token_join(&key, "secret-token-1")).await.unwrap();
    client.present(&cert.der, &key.serialize_der());
    client.follow();
    let mut events = client.policy_events().unwrap();
    let mut link = client.link();
    tokio::time::timeout(Duration::from_secs(10), link.wait_for(|l| l.connected))
        .await
        .expect("the Watch stream is up")
        .unwrap();
    for round in 0..6 {
        let next = KeyPair::generate().unwrap();
        cert = client.renew(renewal(&cert.der, &key, &next)).await.unwrap();
        key = next;
        client.present(&cert.der, &key.serialize_der());
        events.borrow_and_update();
        issuer.announce(["web".to_owned()].into());
        // With a reconnect delayed by the 0–5 s spread, six rounds in a row under 2 s would be luck.
        tokio::time::timeout(Duration::from_secs(2), events.changed())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the policy change did not arrive within 2 s of a renewal"))
            .unwrap();
    }
}

/// Serves `issuer` on a loopback port: the settings of a client pinned to its CA, and the sender
/// that stops the server (kept alive by the caller).
async fn over_the_network(
    issuer: &std::sync::Arc<LocalIssuer>,
) -> (tbot::agent::remote::RemoteSettings, tokio::sync::watch::Sender<bool>) {
    let pin = tbot::issuer::keys::ca::spki_pin(&issuer.current_bundles().x509_authorities[0]).unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let serving = tbot::issuer::server::serve(
        issuer.clone(),
        "127.0.0.1:0".parse().unwrap(),
        vec!["127.0.0.1".into()],
        false,
        stop,
        Default::default(),
    )
    .await
    .unwrap();
    let settings = tbot::agent::remote::RemoteSettings {
        address: serving.address.to_string(),
        ca_pins: vec![pin],
        ca_path: None,
        insecure: false,
    };
    (settings, stop_tx)
}

/// Identities whose templates a hostile value could make collide: `web` (`/svc/{uid}`, any uid) and
/// `db` (`/svc/{uid}/db`), which the bot's role does not allow.
const PREFIXED: &str = "
---
kind: workload_identity
version: v1
metadata: {name: any, labels: {app: web}}
spec:
  spiffe:
    id: '/svc/{{workload.unix.uid}}'
---
kind: workload_identity
version: v1
metadata: {name: db, labels: {app: db}}
spec:
  spiffe:
    id: '/svc/{{workload.unix.uid}}/db'
";

#[tokio::test]
async fn a_hostile_attribute_value_never_renders_another_identitys_spiffe_id() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", PREFIXED)).await;
    let bot_key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let hostile = [
        "0/db",
        "root",
        "..",
        "%2f",
        "0\u{2215}db",
        "-1",
        "007",
        "4294967296",
        "1\n2",
        &"9".repeat(4096),
    ];
    for value in hostile {
        let mut workload = Attributes::new();
        workload.set("workload.unix.uid", value);
        let request = X509Request {
            bot_certificate: bot.der.clone(),
            identity: "any".into(),
            workload,
            public_key: key.subject_public_key_info(),
            ttl: HOUR,
        };
        let refused = issuer.issue_x509(request).await.unwrap_err().to_string();
        assert!(refused.contains("workload.unix.uid"), "{value:?}: {refused}");
        assert!(!refused.contains('\n'), "the value is shown escaped: {refused}");
    }
    // A string attribute may hold a `/`, but never into a SPIFFE ID's segment.
    let dir = tempfile::tempdir().unwrap();
    let by_service = PREFIXED.replace("{{workload.unix.uid}}'", "{{workload.systemd.service}}'");
    let issuer = open(dir.path(), &docs("{}", &by_service)).await;
    let bot = issuer.join(token_join(&bot_key, "secret-token-1")).await.unwrap();
    let mut workload = Attributes::new();
    workload.set("workload.systemd.service", "x/db");
    let refused = issuer
        .issue_x509(X509Request {
            bot_certificate: bot.der.clone(),
            identity: "any".into(),
            workload,
            public_key: key.subject_public_key_info(),
            ttl: HOUR,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("holds a `/`"), "{refused}");
    // An unknown attribute is refused too.
    let mut workload = Attributes::new();
    workload.set("workload.unix.nonsense", "1");
    let refused = issuer
        .resolve(&bot.der, &IdentitySelector::Name("any".into()), &workload)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not a workload attribute"), "{refused}");
}

#[tokio::test]
async fn a_join_or_renewal_with_a_malformed_key_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let good = KeyPair::generate().unwrap();
    let mut bad = token_join(&good, "secret-token-1");
    bad.public_key = vec![0x5a; 64];
    let refused = issuer.join(bad).await.unwrap_err().to_string();
    assert!(refused.contains("the public key"), "{refused}");
    assert!(issuer.instances(None).is_empty(), "no instance was recorded");
    // The token is unspent: the same join with a real key goes through.
    let bot = issuer.join(token_join(&good, "secret-token-1")).await.unwrap();
    // A renewal with a malformed key leaves the generation where it was: the next good one works.
    let next = KeyPair::generate().unwrap();
    let mut bad = renewal(&bot.der, &good, &next);
    bad.public_key = vec![0x04; 65];
    bad.proof = {
        use rcgen::SigningKey;
        good.sign(&bad.public_key).unwrap()
    };
    let refused = issuer.renew(bad).await.unwrap_err().to_string();
    assert!(refused.contains("the public key"), "{refused}");
    let renewed = issuer.renew(renewal(&bot.der, &good, &next)).await.unwrap();
    assert_eq!(renewed.generation, 2, "not taken for a copy");
    // And an X509-SVID is never signed for the CA's own key.
    let ca_spki = {
        let ca = issuer.current_bundles().x509_authorities[0].clone();
        let (_, cert) = parse_x509_certificate(&ca).unwrap();
        cert.tbs_certificate.subject_pki.raw.to_vec()
    };
    // Nor for the JWT signing key (its point from the JWKS, in a P-256 SubjectPublicKeyInfo).
    let jwt_spki = {
        use base64::Engine;
        let jwk = &issuer.current_bundles().jwt_keys[0];
        let coordinate = |c: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk[c].as_str().unwrap())
                .unwrap()
        };
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING { 04 || x || y } }
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
        ];
        spki.extend(coordinate("x"));
        spki.extend(coordinate("y"));
        spki
    };
    for spki in [ca_spki, jwt_spki] {
        let mut request = x509_request(&renewed.der, &next, 1000);
        request.public_key = spki;
        let refused = issuer.issue_x509(request).await.unwrap_err().to_string();
        assert!(refused.contains("a key the issuer holds itself"), "{refused}");
    }
}

#[tokio::test]
async fn a_token_joins_bot_certificate_never_carries_the_tokens_name() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = open(dir.path(), &docs("{}", "")).await;
    let key = KeyPair::generate().unwrap();
    let bot = issuer.join(token_join(&key, "secret-token-1")).await.unwrap();
    let next = KeyPair::generate().unwrap();
    let renewed = issuer.renew(renewal(&bot.der, &key, &next)).await.unwrap();
    for der in [&bot.der, &renewed.der] {
        let text = String::from_utf8_lossy(der);
        assert!(!text.contains("secret-token-1"), "the token's name is the secret");
    }
    let names: Vec<&str> = bot.join.iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["join.meta.join_method"], "nothing but the method");
}
