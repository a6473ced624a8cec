//! The agents connected to the issuer API (an open `Watch` stream each), and when each bot
//! certificate last called, for `tbotctl status`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// The SHA-256 of a bot certificate (DER), shown in hex: how calls with one certificate are told
/// apart (kept as its 32 bytes: one per connected agent in several tables).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertDigest([u8; 32]);

impl CertDigest {
    pub fn of(der: &[u8]) -> CertDigest {
        CertDigest(crate::sha256(der))
    }
}

impl std::fmt::Display for CertDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex(&self.0))
    }
}

impl std::fmt::Debug for CertDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// An agent with an open `Watch` stream.
#[derive(Debug, Clone)]
pub struct AgentSession {
    pub bot: String,
    pub instance: String,
    pub address: SocketAddr,
    pub generation: u64,
    pub connected_at: OffsetDateTime,
    /// SHA-256 of the certificate the stream was opened with: calls with it count as seen.
    pub(super) certificate: CertDigest,
    /// The id of the CA that signed that certificate.
    pub ca: u32,
    /// What the agent last reported holding, by signing key (`None`: nothing reported on this
    /// stream yet, so it may hold anything).
    pub held: Option<crate::issuer::Holdings>,
}

/// An instance whose `Watch` stream the issuer ended because it no longer accepts its certificate
/// (its CA withdrawn, the instance locked), until it connects again.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub bot: String,
    pub instance: String,
    pub address: SocketAddr,
    pub at: OffsetDateTime,
    pub reason: String,
}

/// Refused instances remembered, at most (the oldest go first).
const MAX_REFUSED: usize = 1000;

/// The connected agents, and when each bot certificate last called.
#[derive(Default)]
pub struct Sessions {
    /// `tbot_issuer_api_agents_connected`.
    connected: crate::telemetry::Gauge,
    next: AtomicU64,
    open: Mutex<Open>,
    /// By `bot/instance`.
    refused: Mutex<BTreeMap<String, Refusal>>,
}

/// The open sessions by id (the order they opened in), and by certificate digest their ids and
/// when the certificate last called: a `Report` finds its sessions without reading every agent's.
/// Each session is boxed: ids only grow, so the B-tree's nodes stay about half full, and a node
/// holding sessions inline cost twice their size.
#[derive(Default)]
struct Open {
    by_id: BTreeMap<u64, Box<AgentSession>>,
    by_certificate: HashMap<CertDigest, Streams>,
}

/// The open streams of one certificate (most have one, which takes no allocation), and when a call
/// last came with it. A certificate with no open stream is not kept: only sessions are listed.
struct Streams {
    first: u64,
    more: Vec<u64>,
    seen: OffsetDateTime,
}

impl Streams {
    fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }

    /// Forgets stream `id`; whether none is left.
    fn close(&mut self, id: u64) -> bool {
        if self.first != id {
            self.more.retain(|other| *other != id);
            return false;
        }
        if self.more.is_empty() {
            return true;
        }
        self.first = self.more.remove(0);
        false
    }
}

impl Sessions {
    /// Sessions counted in `connected` (`tbot_issuer_api_agents_connected`).
    pub(super) fn counted(connected: crate::telemetry::Gauge) -> Sessions {
        Sessions {
            connected,
            ..Sessions::default()
        }
    }

    /// Every connected agent with when it last called, oldest connection first.
    pub fn list(&self) -> Vec<(AgentSession, OffsetDateTime)> {
        let open = self.open.lock().expect("sessions poisoned");
        open.by_id
            .values()
            .map(|s| {
                let seen = open
                    .by_certificate
                    .get(&s.certificate)
                    .map_or(s.connected_at, |c| c.seen);
                (AgentSession::clone(s), seen)
            })
            .collect()
    }

    /// How many agents are connected, by the id of their latest stream's certificate's CA.
    pub fn by_ca(&self) -> std::collections::BTreeMap<u32, u64> {
        let mut out = std::collections::BTreeMap::new();
        for session in self.agents() {
            *out.entry(session.ca).or_default() += 1;
        }
        out
    }

    /// Keeps what the agent with `certificate` (its digest) reports holding, with its open streams.
    /// Only a report newer than the one kept replaces it (reports and their resends may cross).
    pub(super) fn hold(&self, certificate: &CertDigest, held: crate::issuer::Holdings) {
        let mut open = self.open.lock().expect("sessions poisoned");
        let Open { by_id, by_certificate } = &mut *open;
        for id in by_certificate.get(certificate).into_iter().flat_map(Streams::ids) {
            if let Some(session) = by_id.get_mut(&id)
                && session.held.as_ref().is_none_or(|h| h.sequence <= held.sequence)
            {
                session.held = Some(held.clone());
            }
        }
    }

    /// Every connected agent once (its latest stream: a renewal or a reconnect may leave an older
    /// one open a while), with what it reported.
    pub fn agents(&self) -> Vec<AgentSession> {
        let open = self.open.lock().expect("sessions poisoned");
        let mut latest: BTreeMap<(&str, &str), &AgentSession> = BTreeMap::new();
        for session in open.by_id.values() {
            latest.insert((&session.bot, &session.instance), session);
        }
        latest.into_values().cloned().collect()
    }

    /// By key name (a CA's pin, a `kid`): how many connected agents hold something it signed (an
    /// SVID, or their bot certificate), and how many SVIDs; under the empty name, the agents that
    /// have not reported yet (they may hold anything).
    pub fn held_by_key(&self) -> BTreeMap<String, [u64; 2]> {
        let mut out = BTreeMap::new();
        for session in self.agents() {
            add_held(&mut out, session.held.as_ref());
        }
        out
    }

    /// The instances refused since they last connected, most recent first.
    pub fn refusals(&self) -> Vec<Refusal> {
        // A day later the instance has most likely been replaced (a new token, a new instance).
        let since = OffsetDateTime::now_utc() - time::Duration::days(1);
        let mut out: Vec<Refusal> = self
            .refused
            .lock()
            .expect("sessions poisoned")
            .values()
            .filter(|r| r.at > since)
            .cloned()
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.at));
        out
    }

    /// The session of `guard` was refused: its stream ends, and the instance is listed as refused.
    pub(super) fn refused(&self, guard: &SessionGuard, reason: &str) {
        let Some(session) = self
            .open
            .lock()
            .expect("sessions poisoned")
            .by_id
            .get(&guard.id)
            .map(|s| AgentSession::clone(s))
        else {
            return;
        };
        tracing::warn!(bot = %session.bot, instance = %session.instance, address = %session.address, %reason,
            "an agent's bot certificate is no longer accepted; its stream ends");
        let mut refused = self.refused.lock().expect("sessions poisoned");
        if refused.len() >= MAX_REFUSED
            && let Some(oldest) = refused.iter().min_by_key(|(_, r)| r.at).map(|(k, _)| k.clone())
        {
            refused.remove(&oldest);
        }
        refused.insert(
            format!("{}/{}", session.bot, session.instance),
            Refusal {
                bot: session.bot,
                instance: session.instance,
                address: session.address,
                at: OffsetDateTime::now_utc(),
                reason: reason.to_owned(),
            },
        );
    }

    /// A call came with `certificate`: its open streams' agent was seen now.
    pub(super) fn seen(&self, certificate: &CertDigest) {
        let mut open = self.open.lock().expect("sessions poisoned");
        if let Some(streams) = open.by_certificate.get_mut(certificate) {
            streams.seen = OffsetDateTime::now_utc();
        }
    }

    pub(super) fn open(self: &Arc<Self>, session: AgentSession) -> SessionGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut refused = self.refused.lock().expect("sessions poisoned");
            if !refused.is_empty() {
                refused.remove(&format!("{}/{}", session.bot, session.instance));
            }
        }
        {
            let mut open = self.open.lock().expect("sessions poisoned");
            let now = OffsetDateTime::now_utc();
            match open.by_certificate.entry(session.certificate) {
                std::collections::hash_map::Entry::Occupied(mut streams) => {
                    let streams = streams.get_mut();
                    streams.more.push(id);
                    streams.seen = now;
                }
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    vacant.insert(Streams {
                        first: id,
                        more: Vec::new(),
                        seen: now,
                    });
                }
            }
            open.by_id.insert(id, Box::new(session));
        }
        self.connected.inc();
        SessionGuard {
            sessions: self.clone(),
            id,
        }
    }
}

/// Adds one agent's holdings to per-key counts (agents, SVIDs); an agent that has not reported is
/// counted under the empty name.
pub fn add_held(out: &mut BTreeMap<String, [u64; 2]>, held: Option<&crate::issuer::Holdings>) {
    let Some(held) = held else {
        out.entry(String::new()).or_default()[0] += 1;
        return;
    };
    let keys: std::collections::BTreeSet<&String> = held
        .x509
        .keys()
        .chain(held.jwt.keys())
        .chain((!held.bot.is_empty()).then_some(&held.bot))
        .collect();
    for key in keys {
        let (svids, _) = held.on(key);
        let entry = out.entry(key.clone()).or_default();
        entry[0] += 1;
        entry[1] += svids;
    }
}

/// Removes a session when its stream ends.
pub(super) struct SessionGuard {
    sessions: Arc<Sessions>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.sessions.open.lock().expect("sessions poisoned");
        if let Some(session) = open.by_id.remove(&self.id)
            && open
                .by_certificate
                .get_mut(&session.certificate)
                .is_some_and(|streams| streams.close(self.id))
        {
            open.by_certificate.remove(&session.certificate);
        }
        drop(open);
        self.sessions.connected.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(instance: &str, certificate: &[u8]) -> AgentSession {
        AgentSession {
            bot: "web".into(),
            instance: instance.into(),
            address: "127.0.0.1:1".parse().unwrap(),
            generation: 1,
            connected_at: OffsetDateTime::now_utc(),
            certificate: CertDigest::of(certificate),
            ca: 1,
            held: None,
        }
    }

    fn held(sequence: u64) -> crate::issuer::Holdings {
        crate::issuer::Holdings {
            bot: "pin".into(),
            sequence,
            ..Default::default()
        }
    }

    fn sequences(sessions: &Sessions) -> Vec<(String, Option<u64>)> {
        let open = sessions.open.lock().unwrap();
        open.by_id
            .values()
            .map(|s| (s.instance.clone(), s.held.as_ref().map(|h| h.sequence)))
            .collect()
    }

    /// Sessions with two streams of instance `a` (certificate `aa`) and one of `b` (`bb`), in
    /// that order.
    fn two_of_aa_and_one_of_bb() -> (Arc<Sessions>, [SessionGuard; 3]) {
        let sessions = Arc::new(Sessions::default());
        let guards = [
            sessions.open(session("a", b"aa")),
            sessions.open(session("a", b"aa")),
            sessions.open(session("b", b"bb")),
        ];
        (sessions, guards)
    }

    #[test]
    fn a_report_reaches_every_stream_of_its_certificate_and_no_other() {
        let (sessions, [first, _second, _other]) = two_of_aa_and_one_of_bb();
        sessions.hold(&CertDigest::of(b"aa"), held(2));
        assert_eq!(
            sequences(&sessions),
            [("a".into(), Some(2)), ("a".into(), Some(2)), ("b".into(), None)]
        );
        // An older report that arrives late is not kept.
        sessions.hold(&CertDigest::of(b"aa"), held(1));
        assert_eq!(sequences(&sessions)[0].1, Some(2));

        // A closed stream leaves the index; the other stream of the certificate still hears.
        drop(first);
        sessions.hold(&CertDigest::of(b"aa"), held(3));
        assert_eq!(sequences(&sessions), [("a".into(), Some(3)), ("b".into(), None)]);
        drop(_second);
        let open = sessions.open.lock().unwrap();
        assert!(
            !open.by_certificate.contains_key(&CertDigest::of(b"aa")),
            "an empty entry is removed"
        );
        assert_eq!(open.by_certificate.len(), 1);
    }

    /// A call with a certificate is when its streams' agent was last seen; a certificate with no
    /// open stream is not kept, and a closed stream leaves the others of its certificate.
    #[test]
    fn a_call_is_seen_on_the_streams_of_its_certificate_only() {
        let (sessions, [first, second, _other]) = two_of_aa_and_one_of_bb();
        let before = sessions.list();
        std::thread::sleep(std::time::Duration::from_millis(5));
        sessions.seen(&CertDigest::of(b"aa"));
        sessions.seen(&CertDigest::of(b"never opened"));
        let after = sessions.list();
        assert!(
            after[0].1 > before[0].1 && after[1].1 > before[1].1,
            "both streams of `aa` seen"
        );
        assert_eq!(after[2].1, before[2].1, "`bb` not seen");
        assert_eq!(
            sessions.open.lock().unwrap().by_certificate.len(),
            2,
            "no entry for a certificate without a stream"
        );
        drop(first);
        assert_eq!(sessions.list()[0].1, after[1].1, "the second stream keeps the time");
        drop(second);
        assert_eq!(sessions.list().len(), 1);
    }
}
