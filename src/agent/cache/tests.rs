//! Unit tests of the SVID cache.
use super::*;
use crate::agent::bot::{self, JoinSettings};
use crate::issuer::LocalIssuer;
use crate::resource::agent::JoinMethod;
use crate::store::Store;
use crate::testing::examples::policy_from_text;

const HOUR: Duration = Duration::from_secs(3600);

async fn cache() -> Arc<SvidCache> {
    let policy = policy_from_text(crate::testing::examples::EXAMPLE_DOCUMENTS);
    let issuer: Arc<dyn Issuer> = Arc::new(LocalIssuer::open(Store::memory(), policy).await.unwrap());
    let settings = JoinSettings {
        method: JoinMethod::Token,
        token: "t".into(),
        ttl: HOUR,
        renewal_interval: HOUR,
    };
    let identity = bot::join(issuer.as_ref(), &settings, &Store::memory(), None, &Default::default())
        .await
        .unwrap();
    // The receiver keeps the last identity after its sender is gone: no renewals in these tests.
    let (_, rx) = watch::channel(Arc::new(identity));
    SvidCache::new(issuer, rx, Default::default())
}

fn resolved() -> Resolved {
    Resolved {
        name: "wi".into(),
        reads: vec!["workload.unix.uid".into()],
    }
}

fn caller(uid: u32, pid: u32) -> Attributes {
    let mut a = Attributes::new();
    a.set("workload.unix.uid", uid).set("workload.unix.pid", pid);
    a
}

async fn ready(rx: &mut watch::Receiver<Slot>) -> Arc<X509Material> {
    let slot = rx.wait_for(|s| matches!(s, Slot::Ready(_))).await.unwrap().clone();
    match slot {
        Slot::Ready(m) => m,
        _ => unreachable!(),
    }
}

#[tokio::test(start_paused = true)]
async fn callers_that_agree_on_the_attributes_read_share_one_issuance() {
    let cache = cache().await;
    let mut a = cache.x509(&resolved(), &caller(1000, 1), HOUR);
    let mut b = cache.x509(&resolved(), &caller(1000, 2), HOUR);
    let mut c = cache.x509(&resolved(), &caller(2000, 3), HOUR);
    let (a, b, c) = (ready(&mut a).await, ready(&mut b).await, ready(&mut c).await);
    assert!(Arc::ptr_eq(&a, &b), "the pid is not read by the identity");
    assert_eq!(c.svid.spiffe_id, "spiffe://example.org/u/2000");
    assert_eq!(cache.issued(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_svid_is_renewed_at_half_its_lifetime_with_jitter_and_pushed() {
    let cache = cache().await;
    let mut rx = cache.x509(&resolved(), &caller(1000, 1), HOUR);
    let first = ready(&mut rx).await;
    tokio::time::sleep(Duration::from_secs(26 * 60)).await;
    assert_eq!(cache.issued(), 1, "not before 27 minutes (half of an hour, -10%)");
    rx.mark_unchanged();
    tokio::time::sleep(Duration::from_secs(8 * 60)).await;
    assert_eq!(cache.issued(), 2, "by 33 minutes (half of an hour, +10%)");
    assert!(rx.has_changed().unwrap(), "the subscriber was told");
    let second = ready(&mut rx).await;
    assert_ne!(first.key, second.key, "a new key");
}

#[tokio::test(start_paused = true)]
async fn a_slot_nobody_holds_serves_the_next_caller_then_goes_at_its_renewal_time() {
    let cache = cache().await;
    let mut rx = cache.x509(&resolved(), &caller(1000, 1), HOUR);
    let first = ready(&mut rx).await;
    drop(rx);
    // A one-shot caller ten minutes later gets the same SVID: no second issuance.
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    let mut rx = cache.x509(&resolved(), &caller(1000, 2), HOUR);
    assert!(Arc::ptr_eq(&first, &ready(&mut rx).await));
    drop(rx);
    assert_eq!(cache.slots(), (1, 1), "one slot, idle");
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(cache.issued(), 1, "no renewals for no one");
    assert_eq!(cache.slots(), (0, 0), "gone at its renewal time");
}

#[tokio::test(start_paused = true)]
async fn idle_slots_are_bounded_and_the_least_recently_used_go_first() {
    let cache = cache().await;
    let mut first = cache.x509(&resolved(), &caller(0, 1), HOUR);
    ready(&mut first).await;
    drop(first);
    for uid in 1..=MAX_IDLE_SLOTS as u32 + 10 {
        tokio::time::advance(Duration::from_millis(1)).await;
        let mut rx = cache.x509(&resolved(), &caller(uid, 1), HOUR);
        ready(&mut rx).await;
    }
    let (total, idle) = cache.slots();
    assert!(idle <= MAX_IDLE_SLOTS, "{idle} idle slots");
    assert_eq!(total, idle);
    let before = cache.issued();
    let mut again = cache.x509(&resolved(), &caller(0, 1), HOUR);
    ready(&mut again).await;
    assert_eq!(cache.issued(), before + 1, "the least recently used slot was evicted");
}

#[tokio::test(start_paused = true)]
async fn a_held_slot_is_never_evicted() {
    let cache = cache().await;
    let mut held = cache.x509(&resolved(), &caller(0, 1), HOUR);
    let material = ready(&mut held).await;
    for uid in 1..=MAX_IDLE_SLOTS as u32 + 10 {
        let mut rx = cache.x509(&resolved(), &caller(uid, 1), HOUR);
        ready(&mut rx).await;
    }
    let mut again = cache.x509(&resolved(), &caller(0, 2), HOUR);
    assert!(Arc::ptr_eq(&material, &ready(&mut again).await));
}

#[tokio::test(start_paused = true)]
async fn jwt_svids_are_reused_until_half_their_lifetime() {
    let cache = cache().await;
    let aud = ["a".to_owned()];
    let first = cache.jwt(&resolved(), &caller(1000, 1), &aud, HOUR).await.unwrap();
    let again = cache.jwt(&resolved(), &caller(1000, 2), &aud, HOUR).await.unwrap();
    assert_eq!(first.token, again.token);
    let other = cache
        .jwt(&resolved(), &caller(1000, 1), &["b".to_owned()], HOUR)
        .await
        .unwrap();
    assert_ne!(first.token, other.token, "another audience, another token");
}

/// The in-process issuer, made unreachable for JWT-SVIDs at will.
struct Outage {
    inner: LocalIssuer,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Issuer for Outage {
    async fn challenge(&self) -> Result<String, IssuerError> {
        self.inner.challenge().await
    }
    async fn join(&self, request: crate::issuer::JoinRequest) -> Result<crate::issuer::BotCertificate, IssuerError> {
        self.inner.join(request).await
    }
    async fn renew(&self, request: crate::issuer::RenewRequest) -> Result<crate::issuer::BotCertificate, IssuerError> {
        self.inner.renew(request).await
    }
    async fn resolve(
        &self,
        bot_certificate: &[u8],
        selector: &crate::issuer::IdentitySelector,
        workload: &Attributes,
    ) -> Result<crate::issuer::Resolution, IssuerError> {
        self.inner.resolve(bot_certificate, selector, workload).await
    }
    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError> {
        self.inner.issue_x509(request).await
    }
    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(IssuerError::Unavailable("the issuer is down".into()));
        }
        self.inner.issue_jwt(request).await
    }
    fn bundles(&self) -> watch::Receiver<Arc<crate::issuer::Bundles>> {
        self.inner.bundles()
    }
}

#[tokio::test]
async fn a_re_decided_jwt_svid_is_issued_again_and_still_served_while_the_issuer_is_down() {
    let policy = policy_from_text(crate::testing::examples::EXAMPLE_DOCUMENTS);
    let outage = Arc::new(Outage {
        inner: LocalIssuer::open(Store::memory(), policy).await.unwrap(),
        down: Default::default(),
    });
    let settings = JoinSettings {
        method: JoinMethod::Token,
        token: "t".into(),
        ttl: HOUR,
        renewal_interval: HOUR,
    };
    let issuer: Arc<dyn Issuer> = outage.clone();
    let identity = bot::join(issuer.as_ref(), &settings, &Store::memory(), None, &Default::default())
        .await
        .unwrap();
    let (_, rx) = watch::channel(Arc::new(identity));
    let cache = SvidCache::new(issuer, rx, Default::default());
    let aud = ["a".to_owned()];
    let held = cache.jwt(&resolved(), &caller(1000, 1), &aud, HOUR).await.unwrap();
    // A gap in the issuer's events re-decides everything; then the issuer goes away.
    cache.redecide(&["wi".to_owned()].into());
    outage.down.store(true, Ordering::Relaxed);
    let served = cache.jwt(&resolved(), &caller(1000, 1), &aud, HOUR).await.unwrap();
    assert_eq!(served.token, held.token, "the held JWT-SVID, still valid, is served");
    // Back: a re-decided one is issued anew.
    outage.down.store(false, Ordering::Relaxed);
    let fresh = cache.jwt(&resolved(), &caller(1000, 1), &aud, HOUR).await.unwrap();
    assert_ne!(fresh.token, held.token);
    // A caller never served gets the outage, not someone else's token.
    outage.down.store(true, Ordering::Relaxed);
    let never = cache.jwt(&resolved(), &caller(2000, 1), &aud, HOUR).await.unwrap_err();
    assert!(never.is_transient(), "{never}");
}
