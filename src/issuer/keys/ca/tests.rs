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
