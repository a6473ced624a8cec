//! The agent following the issuer's keys: a rotation's activation (every cached SVID signed again,
//! the bot certificate renewed), a taint (what the tainted key signed issued again now), a CA that
//! leaves the bundle, a revocation; and its reports of what it holds by signing key, so the issuer
//! knows who still depends on a key.

use std::sync::Arc;

use super::{Agent, Bundles, cache};

impl Agent {
    /// Follows the bundle: when the CA or the JWT key that signs changes (a rotation's activation),
    /// every cached X509-SVID is signed again at once (pushed on open streams and to outputs) and
    /// cached JWT-SVIDs are forgotten, so nothing keeps using the old key.
    pub fn follow_rotations(self: &Arc<Self>) {
        let mut bundles = self.issuer.bundles();
        let signer = |b: &Bundles| (b.signing_ca().map(<[u8]>::to_vec), b.active_kid.clone());
        let mut last = signer(&bundles.borrow_and_update());
        let mut last_revoked = bundles.borrow().revoked.clone();
        let mut last_tainted = Tainted::default();
        let mut last_cas = bundles.borrow().x509_authorities.clone();
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let (now, revoked, tainted) = {
                    let b = bundles.borrow_and_update();
                    (signer(&b), b.revoked.clone(), Tainted::of(&b))
                };
                let Some(agent) = agent.upgrade() else { break };
                if revoked != last_revoked {
                    last_revoked = revoked.clone();
                    agent.follow_revocations(&revoked);
                }
                // Also at start: a tainted key is dealt with whenever this agent first learns of it.
                if tainted != last_tainted {
                    agent.follow_taint(&tainted);
                    last_tainted = tainted;
                }
                // A CA withdrawn (revoked, or retired by force): what it signed no longer verifies
                // anywhere, so it is issued again now rather than at its renewal.
                let cas = bundles.borrow().x509_authorities.clone();
                if cas != last_cas {
                    let published: std::collections::BTreeSet<String> = cas
                        .iter()
                        .filter_map(|ca| crate::issuer::keys::ca::spki_pin(ca))
                        .collect();
                    let woken = agent.cache.reissue_signed_by(|signer| !published.contains(signer));
                    if woken > 0 {
                        tracing::warn!(woken, "a CA left the bundle: issuing again the SVIDs it signed");
                    }
                    last_cas = cas;
                }
                let (ca, jwt) = (now.0 != last.0, now.1 != last.1);
                last = now;
                if jwt {
                    tracing::info!("the JWT signing key changed; cached JWT-SVIDs are issued again when asked for");
                    agent.cache.forget_jwts();
                }
                if ca {
                    let identities = agent.cache.identities();
                    tracing::info!(
                        identities = identities.len(),
                        "the signing CA changed; signing cached SVIDs again"
                    );
                    agent.cache.redecide(&identities);
                    // The bot certificate moves onto the new CA too, long before the old one retires.
                    let signing = last.0.as_deref().unwrap_or_default();
                    if !cache::signed_by(&agent.bot().certificate.der, signing) {
                        tracing::info!("renewing the bot certificate onto the CA that signs now");
                        agent.renew_now.notify_one();
                    }
                }
                drop(agent);
                if bundles.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// A key was tainted: every cached X509-SVID its CA signed is issued again now, cached JWT-SVIDs
    /// it signed are forgotten, and the bot certificate is renewed if the CA signed it. The key
    /// stays in the bundle meanwhile, so nothing fails to verify.
    fn follow_taint(&self, tainted: &Tainted) {
        if tainted.cas.is_empty() && tainted.kids.is_empty() {
            return;
        }
        let x509 = self.cache.reissue_signed_by(|signer| tainted.cas.contains(signer));
        let jwt = self.cache.forget_jwts_of(&tainted.kids);
        tracing::warn!(x509, jwt, "a signing key was tainted: issuing again what it signed");
        self.metrics.tainted_reissued.inc_by((x509 + jwt) as u64);
        let bot = &self.bot().certificate.der;
        let bundles = self.bundles().borrow().clone();
        if bundles.tainted_x509().any(|ca| cache::signed_by(bot, ca)) {
            tracing::warn!("this agent's bot certificate was signed by a tainted CA: renewing it now");
            self.renew_now.notify_one();
        }
    }

    /// Tells the issuer what this agent holds, by signing key, whenever that changes (the cache,
    /// the bundle or the bot certificate moved; a burst is told once), so an operator sees who still
    /// depends on a key before revoking it. A report that fails is sent again a second later.
    pub fn report_holdings(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        let (mut changes, mut bundles, mut bots) = (self.cache.changes(), self.bundles(), self.bot_changes());
        tokio::spawn(async move {
            let mut last: Option<crate::issuer::Holdings> = None;
            let mut sequence = 0u64;
            loop {
                let failed = {
                    let Some(agent) = agent.upgrade() else { return };
                    let now = agent.holdings();
                    if last.as_ref() == Some(&now) {
                        false
                    } else {
                        sequence += 1;
                        let report = crate::issuer::Holdings {
                            sequence,
                            ..now.clone()
                        };
                        let bot = agent.bot();
                        match agent.issuer.report(&bot.certificate.der, report).await {
                            Ok(()) => {
                                last = Some(now);
                                false
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "cannot report what this agent holds; retrying");
                                true
                            }
                        }
                    }
                };
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    r = bundles.changed() => if r.is_err() { return },
                    r = bots.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(HOLDINGS_RETRY), if failed => {}
                }
                tokio::time::sleep(HOLDINGS_SETTLE).await;
            }
        });
    }

    /// What this agent holds now, by signing key (the report's `sequence` left at 0).
    fn holdings(&self) -> crate::issuer::Holdings {
        let mut now = self.cache.holdings();
        let bot = self.bot();
        let bundles = self.bundles().borrow().clone();
        now.bot = bundles
            .x509_authorities
            .iter()
            .find(|ca| cache::signed_by(&bot.certificate.der, ca))
            .and_then(|ca| crate::issuer::keys::ca::spki_pin(ca))
            .unwrap_or_default();
        now
    }

    /// Something was revoked: cached X509-SVIDs it names are issued again at once, and the bot
    /// certificate is renewed if it is among them.
    fn follow_revocations(&self, revoked: &std::collections::BTreeSet<String>) {
        let reissued = self.cache.reissue_revoked(revoked);
        tracing::info!(
            revoked = revoked.len(),
            reissued,
            "the issuer's revocation list changed"
        );
        let bot = cache::serial_of(&self.bot().certificate.der);
        if bot.is_some_and(|s| revoked.contains(&s)) {
            // The issuer refuses it from now on, a renewal included: the renewal's refusal is what
            // the status shows, with what to do.
            tracing::error!(
                "this agent's bot certificate was revoked: the issuer refuses it (a `token` agent must join again with a new token; an `iam` agent joins again by itself)"
            );
            self.renew_now.notify_one();
        }
    }
}

/// After a change of what the agent holds, how long it lets the rest of a burst come before it
/// tells the issuer (a rotation re-signs every SVID within a few milliseconds).
const HOLDINGS_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
/// When a report failed, how soon it is sent again.
const HOLDINGS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The tainted keys a bundle names: CA pins and JWT `kid`s.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tainted {
    cas: std::collections::BTreeSet<String>,
    kids: std::collections::BTreeSet<String>,
}

impl Tainted {
    fn of(bundles: &Bundles) -> Tainted {
        Tainted {
            cas: bundles
                .tainted_x509()
                .filter_map(crate::issuer::keys::ca::spki_pin)
                .collect(),
            kids: bundles.tainted_kids.iter().cloned().collect(),
        }
    }
}
