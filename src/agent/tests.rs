//! Unit tests of the agent: resolutions, re-decisions.
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::issuer::{
    BotCertificate, JoinRequest, JwtRequest, JwtSvid, LocalIssuer, RenewRequest, X509Request, X509Svid,
};
use crate::testing::examples::{EXAMPLE_DOCUMENTS, policy_from_text};

/// The in-process issuer, counting how often it is asked to resolve.
struct Counting {
    inner: LocalIssuer,
    resolves: AtomicUsize,
    /// Resolve answers `Unavailable` (the issuer is down).
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Issuer for Counting {
    async fn challenge(&self) -> Result<String, IssuerError> {
        self.inner.challenge().await
    }
    async fn join(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError> {
        self.inner.join(request).await
    }
    async fn renew(&self, request: RenewRequest) -> Result<BotCertificate, IssuerError> {
        self.inner.renew(request).await
    }
    async fn resolve(
        &self,
        bot_certificate: &[u8],
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Resolution, IssuerError> {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(IssuerError::Unavailable("the issuer is down".into()));
        }
        self.inner.resolve(bot_certificate, selector, workload).await
    }
    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError> {
        self.inner.issue_x509(request).await
    }
    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        self.inner.issue_jwt(request).await
    }
    fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.inner.bundles()
    }
}

async fn agent() -> (Agent, Arc<Counting>) {
    let issuer = Arc::new(Counting {
        inner: LocalIssuer::open(Store::memory(), policy_from_text(EXAMPLE_DOCUMENTS))
            .await
            .unwrap(),
        resolves: AtomicUsize::new(0),
        down: Default::default(),
    });
    let settings = JoinSettings {
        method: JoinMethod::Token,
        token: "t".into(),
        ttl: std::time::Duration::from_secs(3600),
        renewal_interval: std::time::Duration::from_secs(3600),
    };
    let agent = Agent::start(issuer.clone(), settings, Store::memory(), AgentMetrics::default())
        .await
        .unwrap();
    (agent, issuer)
}

fn caller(uid: u32) -> Attributes {
    let mut a = Attributes::new();
    a.set("workload.unix.uid", uid);
    a
}

#[tokio::test]
async fn a_new_process_that_agrees_on_what_the_rules_read_is_resolved_from_the_cache() {
    let (agent, issuer) = agent().await;
    let selector = IdentitySelector::Name("wi".into());
    let process = |pid: u32| {
        let mut a = caller(1000);
        a.set("workload.unix.pid", pid).set("workload.unix.gid", pid % 7);
        a
    };
    let first = agent.resolve(&selector, &process(10)).await.unwrap();
    for pid in 11..20 {
        assert_eq!(agent.resolve(&selector, &process(pid)).await.unwrap(), first);
    }
    assert_eq!(
        issuer.resolves.load(Ordering::Relaxed),
        1,
        "the pid and gid are read by no document: one question for ten processes"
    );
    agent.resolve(&selector, &caller(1001)).await.unwrap();
    assert_eq!(issuer.resolves.load(Ordering::Relaxed), 2, "another uid is asked for");
}

#[tokio::test]
async fn after_a_policy_event_the_last_answers_still_serve_while_the_issuer_is_down() {
    let (agent, issuer) = agent().await;
    let selector = IdentitySelector::Name("wi".into());
    let first = agent.resolve(&selector, &caller(1)).await.unwrap();
    // A reconnect's "re-decide everything", then the issuer goes away.
    agent.forget_resolutions();
    issuer.down.store(true, Ordering::Relaxed);
    assert_eq!(agent.resolve(&selector, &caller(1)).await.unwrap(), first);
    let never = agent.resolve(&selector, &caller(2)).await.unwrap_err();
    assert!(never.is_transient(), "a caller never resolved gets the outage: {never}");
    // Back: the issuer is asked again.
    issuer.down.store(false, Ordering::Relaxed);
    let before = issuer.resolves.load(Ordering::Relaxed);
    agent.resolve(&selector, &caller(1)).await.unwrap();
    assert_eq!(issuer.resolves.load(Ordering::Relaxed), before + 1);
}

#[tokio::test]
async fn a_known_caller_is_resolved_from_the_cache_until_the_documents_change() {
    let (agent, issuer) = agent().await;
    let selector = IdentitySelector::Name("wi".into());
    let first = agent.resolve(&selector, &caller(1)).await.unwrap();
    let again = agent.resolve(&selector, &caller(1)).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        issuer.resolves.load(Ordering::Relaxed),
        1,
        "the second answer came from the cache"
    );
    agent.resolve(&selector, &caller(2)).await.unwrap();
    assert_eq!(
        issuer.resolves.load(Ordering::Relaxed),
        2,
        "another caller is asked for"
    );
    agent.forget_resolutions();
    agent.resolve(&selector, &caller(1)).await.unwrap();
    assert_eq!(
        issuer.resolves.load(Ordering::Relaxed),
        3,
        "the issuer's documents changed"
    );
    agent
        .redecide(&["wi".to_owned()].into(), std::time::Duration::ZERO)
        .await;
    agent.resolve(&selector, &caller(1)).await.unwrap();
    assert_eq!(
        issuer.resolves.load(Ordering::Relaxed),
        4,
        "streams were told to re-resolve"
    );
}
