//! Unit tests of `ca`.

use super::*;
use crate::kv::{Kek, MemoryKv};

fn td(name: &str) -> TrustDomain {
    TrustDomain::parse(name).unwrap()
}

#[tokio::test]
async fn a_second_creator_adopts_the_first_ca_and_a_swapped_certificate_is_refused() {
    let kek = Kek::from_bytes(&[9; 32], std::path::Path::new("/k"));
    let backing = Backing::new(Arc::new(MemoryKv::new()), Some(kek));
    let now = OffsetDateTime::now_utc();
    let settings = CaSettings::default();
    let domain = td("example.org");
    let (a, b) = tokio::join!(
        Authority::load_or_create(&backing, &domain, &settings, now),
        Authority::load_or_create(&backing, &domain, &settings, now)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.active().certificate_der(), b.active().certificate_der());
    // The key is sealed in the store.
    let stored = backing.kv.get("issuer/example.org/ca-1.key").await.unwrap().unwrap();
    assert!(stored.value.starts_with(b"tbot-sealed-v1"));
    // Someone with write access puts another CA's certificate in place of ours.
    let other_domain = td("other.org");
    let other = Authority::load_or_create(&backing, &other_domain, &settings, now)
        .await
        .unwrap();
    backing
        .kv
        .txn(
            vec![],
            vec![Op::put(
                "issuer/example.org/ca-1.der",
                other.active().certificate_der().to_vec(),
            )],
        )
        .await
        .unwrap();
    let Err(err) = Authority::load(&backing, &domain).await else {
        panic!("a swapped CA certificate must be refused");
    };
    assert!(err.to_string().contains("the CA certificate was replaced"), "{err}");
}

#[tokio::test]
async fn the_cross_chain_certifies_the_active_ca_under_every_other_published_ca() {
    let backing = Backing::new(Arc::new(MemoryKv::new()), None);
    let now = OffsetDateTime::now_utc();
    let settings = CaSettings::default();
    let first = Authority::load_or_create(&backing, &td("example.org"), &settings, now)
        .await
        .unwrap();
    assert!(
        first.cross_chain(now).unwrap().is_empty(),
        "one CA: nothing to cross-sign"
    );
    let (prepared, _) = first
        .stepped(&backing, Step::Prepare { activate_at: 0 }, &settings, now)
        .unwrap();
    let (active2, _) = prepared
        .stepped(&backing, Step::Activate { id: 2 }, &settings, now)
        .unwrap();
    for authority in [&prepared, &active2] {
        let chain = authority.cross_chain(now).unwrap();
        assert_eq!(chain.len(), 2);
        let (_, cross) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, active) = x509_parser::parse_x509_certificate(authority.active().certificate_der()).unwrap();
        let other = authority
            .cas()
            .iter()
            .find(|ca| ca.id != authority.active().id)
            .unwrap();
        assert_eq!(
            chain[1],
            other.certificate_der(),
            "the other CA follows its cross-signature"
        );
        // The active CA's exact name and key, signed by the other CA: a path from a leaf of the
        // active CA to a client that pinned the other one.
        assert_eq!(cross.subject().as_raw(), active.subject().as_raw());
        assert_eq!(cross.public_key().raw, active.public_key().raw);
        assert!(other.signed(&cross), "signed by the other CA");
        assert!(cross.is_ca());
    }
}

#[tokio::test]
async fn edited_ca_settings_prepare_a_successor_first_and_only_once() {
    let backing = Backing::new(Arc::new(MemoryKv::new()), None);
    let now = OffsetDateTime::now_utc();
    let first = Authority::load_or_create(&backing, &td("example.org"), &CaSettings::default(), now)
        .await
        .unwrap();
    assert_eq!(first.for_settings(&CaSettings::default(), now), None);
    let edited = CaSettings {
        algorithm: KeyAlgorithm::Ed25519,
        ..CaSettings::default()
    };
    // The schedule itself never rotates for settings (replicas in a rollout would disagree).
    assert_eq!(first.due(&edited, now).0, None);
    let step = first.for_settings(&edited, now);
    let activate_at = now.unix_timestamp() + SETTINGS_GRACE.as_secs() as i64;
    assert_eq!(step, Some(Step::Prepare { activate_at }), "published before it signs");
    let (prepared, _) = first.stepped(&backing, step.unwrap(), &edited, now).unwrap();
    assert_eq!(prepared.cas().len(), 2);
    assert_eq!(
        prepared.active().algorithm(),
        KeyAlgorithm::EcdsaP256,
        "the old CA still signs"
    );
    assert_eq!(
        prepared.for_settings(&edited, now),
        None,
        "one successor, not one per edit"
    );
    let later = OffsetDateTime::from_unix_timestamp(activate_at).unwrap();
    assert_eq!(prepared.due(&edited, later).0, Some(Step::Activate { id: 2 }));
}
