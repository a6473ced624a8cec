//! The agents connected to the issuer API (an open `Watch` stream each), and when each bot
//! certificate last called, for `tbotctl status`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// An agent with an open `Watch` stream.
#[derive(Debug, Clone)]
pub struct AgentSession {
    pub bot: String,
    pub instance: String,
    pub address: SocketAddr,
    pub generation: u64,
    pub connected_at: OffsetDateTime,
    /// SHA-256 (hex) of the certificate the stream was opened with: calls with it count as seen.
    pub(super) certificate: String,
}

/// The connected agents, and when each bot certificate last called.
#[derive(Default)]
pub struct Sessions {
    /// `tbot_issuer_api_agents_connected`.
    connected: crate::telemetry::Gauge,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, AgentSession>>,
    last_seen: Mutex<HashMap<String, OffsetDateTime>>,
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
        let seen = self.last_seen.lock().expect("sessions poisoned");
        self.open
            .lock()
            .expect("sessions poisoned")
            .values()
            .map(|s| (s.clone(), seen.get(&s.certificate).copied().unwrap_or(s.connected_at)))
            .collect()
    }

    pub(super) fn seen(&self, certificate: &str) {
        let mut seen = self.last_seen.lock().expect("sessions poisoned");
        // Renewed certificates leave their digests behind: keep only those of open streams.
        if seen.len() > 100_000 {
            let open: std::collections::HashSet<String> = self
                .open
                .lock()
                .expect("sessions poisoned")
                .values()
                .map(|s| s.certificate.clone())
                .collect();
            seen.retain(|digest, _| open.contains(digest));
        }
        match seen.get_mut(certificate) {
            Some(at) => *at = OffsetDateTime::now_utc(),
            None => {
                seen.insert(certificate.to_owned(), OffsetDateTime::now_utc());
            }
        }
    }

    pub(super) fn open(self: &Arc<Self>, session: AgentSession) -> SessionGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().expect("sessions poisoned").insert(id, session);
        self.connected.inc();
        SessionGuard {
            sessions: self.clone(),
            id,
        }
    }
}

/// Removes a session when its stream ends.
pub(super) struct SessionGuard {
    sessions: Arc<Sessions>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.open.lock().expect("sessions poisoned").remove(&self.id);
        self.sessions.connected.dec();
    }
}
