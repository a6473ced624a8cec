//! Keys and signing: the trust domain's CA ([`ca`]) and JWT key ([`jwt`]), their rotation phases
//! ([`rotation`]), minting X509-SVIDs, JWT-SVIDs and serving certificates ([`mint`]), and what a
//! public key must be to be signed for ([`public`]).

pub mod ca;
pub mod crl;
pub mod jwt;
pub mod mint;
pub mod public;
pub mod rotation;

use crate::issuer::IssuerError;

/// `buf` filled from the system's generator (aws-lc's DRBG): for secrets and challenges.
pub fn random(buf: &mut [u8]) -> Result<(), IssuerError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| IssuerError::Crypto("the random generator failed".into()))
}

/// How many bytes [`unique`] draws from the generator at a time.
const POOL: usize = 1024;

thread_local! {
    /// Bytes drawn and not handed out yet, at `.1..`.
    static UNIQUE: std::cell::RefCell<([u8; POOL], usize)> = const { std::cell::RefCell::new(([0; POOL], POOL)) };
}

/// `buf` filled with random bytes for values that are published and must be unpredictable and
/// never repeat, but are not secrets: certificate serial numbers, JWT `jti`s, bot instance IDs.
/// They come from the same generator as [`random`]'s, drawn [`POOL`] bytes at a time into a pool
/// of this thread: aws-lc's generator costs about 0.5 µs a call whatever the size up to 1 KiB (it
/// mixes the CPU's own random numbers into every call), about a seventh of an issuance's work
/// besides its signature. Each byte is handed out once and zeroed as it is. tbot never forks
/// without exec, so no two processes share a pool.
pub fn unique(buf: &mut [u8]) -> Result<(), IssuerError> {
    if buf.len() > POOL {
        return random(buf);
    }
    UNIQUE.with_borrow_mut(|(pool, at)| {
        if POOL - *at < buf.len() {
            random(pool)?;
            *at = 0;
        }
        let taken = &mut pool[*at..*at + buf.len()];
        buf.copy_from_slice(taken);
        taken.fill(0);
        *at += buf.len();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_values_never_repeat_across_refills_of_the_pool() {
        let mut seen = std::collections::HashSet::new();
        // Three pools' worth of 16-byte values, then sizes that straddle a refill.
        for size in std::iter::repeat_n(16, 3 * POOL / 16).chain([1000, 100, 1000, 7, POOL, POOL + 1, 16]) {
            let mut value = vec![0u8; size];
            unique(&mut value).unwrap();
            assert!(
                value.iter().any(|b| *b != 0),
                "a drawn value of {size} bytes is all zero"
            );
            if size >= 16 {
                assert!(
                    seen.insert(value[..16].to_vec()),
                    "a value of {size} bytes repeats an earlier one"
                );
            }
        }
        // What was handed out is gone from the pool.
        UNIQUE.with_borrow(|(pool, at)| assert!(pool[..*at].iter().all(|b| *b == 0)));
    }
}
