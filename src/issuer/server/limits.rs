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

/// Token buckets by key; the table forgets full buckets when it grows.
pub struct Buckets {
    what: &'static str,
    rate: Rate,
    table: Mutex<HashMap<String, (f64, Instant)>>,
}

const MAX_KEYS: usize = 100_000;

impl Buckets {
    pub fn new(what: &'static str, rate: Rate) -> Buckets {
        Buckets {
            what,
            rate,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`, or says which limit refused.
    pub fn take(&self, key: &str) -> Result<(), IssuerError> {
        let now = Instant::now();
        let mut table = self.table.lock().expect("buckets poisoned");
        if table.len() >= MAX_KEYS {
            let rate = self.rate;
            table.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate.per_second < rate.burst
            });
        }
        let (tokens, at) = table.entry(key.to_owned()).or_insert((self.rate.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate.per_second).min(self.rate.burst);
        *at = now;
        if *tokens < 1.0 {
            return Err(IssuerError::Limited(format!(
                "rate limit: at most {} {} per second (bursts of {}) from `{key}`; slow down and retry",
                self.rate.per_second, self.what, self.rate.burst
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_names_the_limit() {
        let b = Buckets::new(
            "joins",
            Rate {
                burst: 2.0,
                per_second: 0.001,
            },
        );
        b.take("10.0.0.1").unwrap();
        b.take("10.0.0.1").unwrap();
        let e = b.take("10.0.0.1").unwrap_err().to_string();
        assert!(e.contains("at most 0.001 joins per second"), "{e}");
        b.take("10.0.0.2").expect("another address has its own bucket");
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
        assert_eq!(table[&address.ip()].1, 49, "one line, 49 held for the next");
    }
}

/// Logs refusals (joins, or malformed requests of bots: one log each) at most once per source address every [`REFUSAL_LOG_EVERY`], with how many
/// were refused since: one source cannot fill the log (or hide other lines) by failing fast. Every
/// string a client sent is shown escaped: a newline or a terminal escape is printed, not acted on.
#[derive(Default)]
pub struct RefusalLog {
    /// By source address: when it was last logged, and the refusals not logged since.
    table: Mutex<HashMap<std::net::IpAddr, (Option<Instant>, u64)>>,
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
        let now = Instant::now();
        let mut table = self.table.lock().expect("refusal log poisoned");
        if table.len() >= MAX_KEYS {
            table.retain(|_, (at, _)| at.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY));
        }
        let (at, held) = table.entry(address.ip()).or_insert((None, 0));
        if at.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            *held += 1;
            return None;
        }
        *at = Some(now);
        Some(std::mem::take(held))
    }
}
