//! Limits of the issuer API: token buckets per source address (joins) and per bot instance
//! (issuance), and the largest fields a request may carry. Every refusal names the limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::issuer::IssuerError;

/// The largest message the issuer API decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest public key (an RSA-4096 SubjectPublicKeyInfo is about 550 bytes).
pub const MAX_PUBLIC_KEY_BYTES: usize = 2048;
/// Workload attributes per request, and bytes per value.
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTE_BYTES: usize = 4096;
/// Audiences per JWT-SVID.
pub const MAX_AUDIENCES: usize = 16;
/// Bytes of a name (token, identity, label).
pub const MAX_NAME_BYTES: usize = 512;

/// A rate: `burst` at once, `per_second` sustained.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: f64,
    pub per_second: f64,
}

/// Joins per source address: a host joins once and renews; a burst covers a restart storm of the
/// agents behind one NAT address.
pub const JOINS_PER_ADDRESS: Rate = Rate {
    burst: 200.0,
    per_second: 50.0,
};
/// Issuances and renewals per bot instance (SPIRE signs 500/s per address).
pub const CALLS_PER_INSTANCE: Rate = Rate {
    burst: 1000.0,
    per_second: 500.0,
};

/// Token buckets by key (a source address, a certificate's digest), in a bounded [`Table`] (a full
/// bucket is the one forgotten).
pub struct Buckets<K> {
    rate: Rate,
    table: Mutex<Table<K, (f64, Instant)>>,
}

/// The most sources a table of limits holds.
const MAX_KEYS: usize = 100_000;
/// A full table looks for entries to forget at most this often: a flood of new sources costs one
/// pass over the table per interval, not one per request.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Entries by source, bounded: at [`MAX_KEYS`] it forgets what can be forgotten (at most every
/// [`SWEEP_EVERY`]), and while still full it has no room for a source it does not hold. A sweep
/// that leaves it full says so at WARN, with how many new sources found no room since the last.
struct Table<K, V> {
    /// What it holds, and what becomes of a new source with no room: for the WARN.
    what: &'static str,
    turned: &'static str,
    entries: HashMap<K, V>,
    swept: Option<Instant>,
    /// New sources that found no room since the last WARN.
    turned_away: u64,
}

impl<K: std::hash::Hash + Eq, V> Table<K, V> {
    fn new(what: &'static str, turned: &'static str) -> Self {
        Table {
            what,
            turned,
            entries: HashMap::new(),
            swept: None,
            turned_away: 0,
        }
    }

    /// Whether `key` has an entry or room for one now; `forget` says which entries may go.
    fn room_for<Q>(&mut self, key: &Q, now: Instant, mut forget: impl FnMut(&V) -> bool) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if self.entries.len() < MAX_KEYS || self.entries.contains_key(key) {
            return true;
        }
        if self.swept.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
            self.entries.retain(|_, v| !forget(v));
            self.swept = Some(now);
            if self.entries.len() >= MAX_KEYS {
                tracing::warn!(
                    table = self.what,
                    turned_away = self.turned_away,
                    "{MAX_KEYS} sources are active at once in the issuer's table of {} (a flood from many sources?): new ones {} until some go idle; {} since the last line",
                    self.what,
                    self.turned,
                    self.turned_away
                );
                self.turned_away = 0;
            }
        }
        let room = self.entries.len() < MAX_KEYS;
        if !room {
            self.turned_away += 1;
        }
        room
    }
}

impl<K: std::hash::Hash + Eq + Clone + std::fmt::Display> Buckets<K> {
    pub fn new(what: &'static str, rate: Rate) -> Buckets<K> {
        Buckets {
            rate,
            table: Mutex::new(Table::new(what, "are refused")),
        }
    }

    /// Takes one token for `key`, or says which limit refused.
    pub fn take(&self, key: &K) -> Result<(), IssuerError> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &K, now: Instant) -> Result<(), IssuerError> {
        let mut table = self.table.lock().expect("buckets poisoned");
        let rate = self.rate;
        // A full bucket is what a new one would be: forgetting it changes nothing.
        let full = |&(tokens, at): &(f64, Instant)| {
            tokens + now.duration_since(at).as_secs_f64() * rate.per_second >= rate.burst
        };
        if !table.room_for(key, now, full) {
            return Err(IssuerError::Limited(format!(
                "rate limit: the issuer tracks at most {MAX_KEYS} sources of {} at once and they are all active (a flood of new sources?); `{key}` is refused until some go idle (looked for once a second)",
                table.what
            )));
        }
        let (tokens, at) = table.entries.entry(key.clone()).or_insert((self.rate.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate.per_second).min(self.rate.burst);
        *at = now;
        if *tokens < 1.0 {
            return Err(IssuerError::Limited(format!(
                "rate limit: at most {} {} per second (bursts of {}) from `{key}`; slow down and retry",
                self.rate.per_second, table.what, self.rate.burst
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }
}

/// Refuses a field larger than `max` bytes, naming it.
pub fn check_len(field: &str, len: usize, max: usize) -> Result<(), IssuerError> {
    if len > max {
        return Err(IssuerError::Invalid(format!(
            "`{field}` is {len} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

/// Logs refusals (joins, or malformed requests of bots: one log each) at most once per source address every [`REFUSAL_LOG_EVERY`], with how many
/// were refused since: one source cannot fill the log (or hide other lines) by failing fast. Every
/// string a client sent is shown escaped: a newline or a terminal escape is printed, not acted on.
pub struct RefusalLog {
    /// By source address: when it was last logged, and the refusals not logged since.
    table: Mutex<Table<std::net::IpAddr, (Option<Instant>, u64)>>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            table: Mutex::new(Table::new("refusals logged", "get no log line")),
        }
    }
}

/// How often one source's refusals are logged at most.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl RefusalLog {
    /// A refused join (INFO: wrong tokens and rate limits are what a port on a network sees).
    pub fn refused(&self, address: std::net::SocketAddr, error: &IssuerError) {
        let Some(also) = self.due(address) else { return };
        let error = error.to_string().escape_debug().to_string();
        if also > 0 {
            tracing::info!(%address, %error, also_refused = also, "join refused (and {also} more from this address since the last line)");
        } else {
            tracing::info!(%address, %error, "join refused");
        }
    }

    /// A malformed request from an authenticated bot (WARN: no tbot agent of this version sends
    /// one, so its holder is a client of another kind, or the bot's key is in other hands). `bot`
    /// names the certificate's bot instance; it is asked only when a line is written.
    pub fn malformed(&self, address: std::net::SocketAddr, bot: impl FnOnce() -> String, error: &IssuerError) {
        let Some(also) = self.due(address) else { return };
        let error = error.to_string().escape_debug().to_string();
        let bot = bot();
        tracing::warn!(%address, %bot, %error, also_refused = also,
            "a bot sent a request no tbot agent of this version sends; refused (check who holds this bot instance's key: `tbotctl get bot/...`)");
    }

    /// A connection refused before TLS (a PROXY header missing or malformed: WARN, as it is most
    /// likely the balancer's configuration).
    pub fn connection(&self, address: std::net::SocketAddr, error: &str) {
        let Some(also) = self.due(address) else { return };
        let error = error.escape_debug().to_string();
        tracing::warn!(peer = %address, %error, also_refused = also, "issuer API: connection refused");
    }

    /// Whether a line for `address` is due now, and how many refusals were held since the last.
    fn due(&self, address: std::net::SocketAddr) -> Option<u64> {
        self.due_at(address, Instant::now())
    }

    fn due_at(&self, address: std::net::SocketAddr, now: Instant) -> Option<u64> {
        let mut table = self.table.lock().expect("refusal log poisoned");
        // An entry may go once its interval is over (its held count is lost: a flood from this
        // many sources is in the lines already written). While the table is full of sources
        // logged within the interval, a new source gets no line.
        let over = |&(at, _): &(Option<Instant>, u64)| at.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY);
        if !table.room_for(&address.ip(), now, over) {
            return None;
        }
        let (at, held) = table.entries.entry(address.ip()).or_insert((None, 0));
        if at.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            *held += 1;
            return None;
        }
        *at = Some(now);
        Some(std::mem::take(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_names_the_limit() {
        let b: Buckets<String> = Buckets::new(
            "joins",
            Rate {
                burst: 2.0,
                per_second: 0.001,
            },
        );
        b.take(&"10.0.0.1".to_owned()).unwrap();
        b.take(&"10.0.0.1".to_owned()).unwrap();
        let e = b.take(&"10.0.0.1".to_owned()).unwrap_err().to_string();
        assert!(e.contains("at most 0.001 joins per second"), "{e}");
        b.take(&"10.0.0.2".to_owned())
            .expect("another address has its own bucket");
    }

    /// A flood of sources fills the table: a new source is refused, naming the limit, instead of
    /// growing it; a full table is looked through once per interval, not once per request; known
    /// sources are served meanwhile; once the buckets have refilled, a new source is served again.
    #[test]
    fn a_flood_of_sources_is_bounded_and_costs_one_pass_per_interval() {
        let b: Buckets<String> = Buckets::new("joins", JOINS_PER_ADDRESS);
        let start = Instant::now();
        for i in 0..MAX_KEYS {
            b.take_at(&format!("k{i}"), start).unwrap();
        }
        let e = b.take_at(&"new".to_owned(), start).unwrap_err().to_string();
        assert!(e.contains("at most 100000 sources of joins at once"), "{e}");
        assert_eq!(b.table.lock().unwrap().turned_away, 1);
        assert_eq!(b.table.lock().unwrap().swept, Some(start));
        let soon = start + SWEEP_EVERY / 2;
        assert!(b.take_at(&"new".to_owned(), soon).is_err());
        assert_eq!(b.table.lock().unwrap().swept, Some(start), "one pass per interval");
        assert_eq!(b.table.lock().unwrap().entries.len(), MAX_KEYS);
        b.take_at(&"k7".to_owned(), soon).expect("a known source is served");
        // 200 at 50/s: every bucket is full again 20 ms after its take; the next pass forgets them.
        b.take_at(&"new".to_owned(), start + SWEEP_EVERY).unwrap();
        assert_eq!(b.table.lock().unwrap().entries.len(), 1);
    }

    /// The same bound for the refusal log: while it is full of sources logged within the interval,
    /// a new source gets no line (its refusal still happens), and a known one is held as before.
    #[test]
    fn a_flood_of_refused_sources_gets_no_new_lines_until_the_interval_is_over() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let address = |i: usize| std::net::SocketAddr::from((std::net::Ipv6Addr::from(i as u128), 4000));
        for i in 0..MAX_KEYS {
            assert_eq!(log.due_at(address(i), start), Some(0));
        }
        let new = address(MAX_KEYS);
        assert_eq!(log.due_at(new, start), None, "no line for a new source while full");
        assert_eq!(log.due_at(address(1), start), None);
        assert_eq!(
            log.table.lock().unwrap().entries[&address(1).ip()].1,
            1,
            "held for its next line"
        );
        assert_eq!(log.table.lock().unwrap().entries.len(), MAX_KEYS);
        assert_eq!(log.due_at(new, start + REFUSAL_LOG_EVERY), Some(0));
        assert_eq!(log.table.lock().unwrap().entries.len(), 1);
    }

    #[test]
    fn refusals_from_one_source_are_logged_once_per_interval() {
        let log = RefusalLog::default();
        let address: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let e = IssuerError::Invalid("join method \"x\\n2026 INFO forged\" is not one".into());
        for _ in 0..50 {
            log.refused(address, &e);
        }
        let table = log.table.lock().unwrap();
        assert_eq!(table.entries[&address.ip()].1, 49, "one line, 49 held for the next");
    }
}
