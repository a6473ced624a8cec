//! tbot: a declarative machine & workload identity agent (how it is built: `docs/architecture.md`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod aws;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod error;
pub mod issuer;
pub mod kv;
pub mod manifest;
pub mod pem;
pub mod resource;
pub mod spiffe_bundle;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod workload_api;

/// What `--version` prints: the package version and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("TBOT_GIT_COMMIT"), ")");

/// Crash testing: with `TBOT_FAILPOINT=<name>[@<n>]` in its environment the process aborts the `n`th
/// time (default the first) it reaches the point of that name — no destructor, no flush, like
/// SIGKILL. `tests/crash_safety.rs` uses it to crash inside the windows a random kill rarely hits:
/// - `join-answered`: the issuer consumed the token and signed; the agent has not saved the answer;
/// - `renew-answered`: the issuer moved the bot's generation; the agent has not saved the answer;
/// - `identity-half-saved`: the new bot certificate is saved, its key not yet;
/// - `store-logged`: the issuer's `directory` store has its transactions in the log on disk, and
///   has neither applied nor answered them nor written their files.
pub fn failpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<(String, u32)>> = std::sync::OnceLock::new();
    static HITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let point = POINT.get_or_init(|| {
        let value = std::env::var("TBOT_FAILPOINT").ok()?;
        let (point, nth) = value.split_once('@').unwrap_or((&value, "1"));
        Some((point.to_owned(), nth.parse().unwrap_or(1)))
    });
    if let Some((point, nth)) = point
        && point == name
        && HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == *nth
    {
        eprintln!("TBOT_FAILPOINT={name}@{nth}: aborting here");
        std::process::abort();
    }
}

/// Lower-case hex of `bytes` (digests, pins, IDs).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lower-case hex of the SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha256(bytes))
}

/// SHA-256.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A time as RFC 3339 in whole seconds (`2026-12-04T18:00:56Z`): the one format tbot shows times in.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// An error with its sources, `outer: inner: innermost`, for messages.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
