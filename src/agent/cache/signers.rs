//! What the cache holds by the key that signed it: the report to the issuer, and issuing again
//! what a revoked serial, a tainted key or a withdrawn CA covers.

use std::collections::BTreeSet;

use super::{Slot, SvidCache, now, serial_of};

/// The `kid` in a JWT's header.
pub fn kid_of(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

impl SvidCache {
    /// Issues again now every cached X509-SVID whose serial is `revoked` (its key leaked: a relying
    /// party that reads the CRL refuses it already). Returns how many.
    pub fn reissue_revoked(&self, revoked: &BTreeSet<String>) -> usize {
        let mut woken = 0;
        for handle in self.slots.lock().expect("cache poisoned").values() {
            let hit = matches!(&*handle.tx.borrow(), Slot::Ready(m)
                if serial_of(&m.svid.certificate).is_some_and(|s| revoked.contains(&s)));
            if hit {
                handle.wake.notify_one();
                woken += 1;
            }
        }
        woken
    }

    /// Issues again now every cached X509-SVID whose signer (its CA's pin) `stale` says must go: a
    /// tainted CA (still trusted, but nothing it signed may stay in use), or one no longer in the
    /// bundle. Returns how many.
    pub fn reissue_signed_by(&self, stale: impl Fn(&str) -> bool) -> usize {
        let mut woken = 0;
        for handle in self.slots.lock().expect("cache poisoned").values() {
            if matches!(&*handle.tx.borrow(), Slot::Ready(m) if !m.signer.is_empty() && stale(&m.signer)) {
                handle.wake.notify_one();
                woken += 1;
            }
        }
        woken
    }

    /// Forgets the cached JWT-SVIDs signed by a key whose `kid` is in `kids` (tainted): they are
    /// issued again when asked for. Returns how many.
    pub fn forget_jwts_of(&self, kids: &BTreeSet<String>) -> usize {
        let mut jwts = self.jwts.lock().expect("cache poisoned");
        let before = jwts.len();
        jwts.retain(|_, held| kid_of(&held.svid.token).is_none_or(|kid| !kids.contains(&kid)));
        let dropped = before - jwts.len();
        if dropped > 0 {
            self.changed();
        }
        dropped
    }

    /// What the cache holds that is still valid, by the key that signed it: X509-SVIDs by their
    /// CA's pin, JWT-SVIDs by `kid`.
    pub fn holdings(&self) -> crate::issuer::Holdings {
        let mut out = crate::issuer::Holdings::default();
        let now = now();
        for handle in self.slots.lock().expect("cache poisoned").values() {
            if let Slot::Ready(m) = &*handle.tx.borrow()
                && m.svid.not_after > now
                && !m.signer.is_empty()
            {
                *out.x509.entry(m.signer.clone()).or_default() += 1;
            }
        }
        for held in self.jwts.lock().expect("cache poisoned").values() {
            if held.svid.expires > now
                && let Some(kid) = kid_of(&held.svid.token)
            {
                *out.jwt.entry(kid).or_default() += 1;
            }
        }
        out
    }
}
