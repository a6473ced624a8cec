//! What the issuer signs a certificate for: only a real public key. A bot sends the
//! SubjectPublicKeyInfo of the key it holds; it is parsed and checked before anything is recorded or
//! signed:
//! - ECDSA P-256: an uncompressed point (65 bytes, `04 || x || y`) on the curve;
//! - Ed25519: exactly 32 bytes;
//! - RSA of 2048 to 8192 bits, only where `cluster.spec.ca.accept_rsa_keys` allows it.
//!
//! Only these exact forms pass (a compressed point, or a whole SubjectPublicKeyInfo inside the bit
//! string, is refused even where a parser would take it), so one key has one form, and a key the
//! issuer holds itself (a CA's, a JWT signing key's, its serving certificates') is recognised and
//! refused.

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ED25519, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::issuer::IssuerError;

/// A public key in its one accepted form: what [`check`] compares against the keys the issuer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The uncompressed point.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
    /// The modulus (without leading zeros) and the public exponent.
    Rsa {
        modulus: Vec<u8>,
        exponent: Vec<u8>,
        bits: usize,
    },
}

impl Key {
    /// The key of a certificate the issuer made itself (a CA's, a serving certificate's).
    pub fn of_certificate(der: &[u8]) -> Option<Key> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        parse(cert.public_key().raw).ok()
    }
}

/// The three key algorithms the issuer reads, by a SubjectPublicKeyInfo's algorithm OID.
#[derive(Clone, Copy)]
enum Algorithm {
    P256,
    Ed25519,
    Rsa,
}

impl Algorithm {
    fn of(oid: &x509_parser::oid_registry::Oid<'_>) -> Option<Algorithm> {
        if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            Some(Algorithm::P256)
        } else if *oid == OID_SIG_ED25519 {
            Some(Algorithm::Ed25519)
        } else if *oid == OID_PKCS1_RSAENCRYPTION {
            Some(Algorithm::Rsa)
        } else {
            None
        }
    }

    /// How aws-lc verifies a signature of a key of this algorithm.
    fn verification(self) -> &'static dyn aws_lc_rs::signature::VerificationAlgorithm {
        match self {
            Algorithm::P256 => &ECDSA_P256_SHA256_ASN1,
            Algorithm::Ed25519 => &ED25519,
            Algorithm::Rsa => &RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

fn invalid(why: &str) -> IssuerError {
    IssuerError::Invalid(format!("the public key {why}"))
}

/// Parses a SubjectPublicKeyInfo (DER) into its one accepted form, checking the key is valid.
/// (An RSA key has 2048 to 8192 bits.)
pub fn parse(spki: &[u8]) -> Result<Key, IssuerError> {
    let (rest, parsed) =
        SubjectPublicKeyInfo::from_der(spki).map_err(|_| invalid("is not a DER SubjectPublicKeyInfo"))?;
    if !rest.is_empty() {
        return Err(invalid("has bytes after its SubjectPublicKeyInfo"));
    }
    let bits = parsed.subject_public_key.data.as_ref();
    let oid = &parsed.algorithm.algorithm;
    let Some(algorithm) = Algorithm::of(oid) else {
        return Err(invalid(&format!(
            "has algorithm {}; use an ECDSA P-256 or Ed25519 key",
            oid.to_id_string()
        )));
    };
    let valid = |bytes: &[u8]| {
        ParsedPublicKey::new(algorithm.verification(), bytes)
            .map(drop)
            .map_err(|e| invalid(&format!("is not a valid key of its algorithm ({e})")))
    };
    match algorithm {
        Algorithm::P256 => {
            let curve = parsed.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
            if curve != Some(OID_EC_P256) {
                return Err(invalid("is an EC key of another curve than P-256"));
            }
            if bits.len() != 65 || bits[0] != 0x04 {
                return Err(invalid(
                    "is not an uncompressed P-256 point (65 bytes starting with 04)",
                ));
            }
            valid(bits)?;
            Ok(Key::P256(bits.to_vec()))
        }
        Algorithm::Ed25519 => {
            if bits.len() != 32 {
                return Err(invalid(&format!("is an Ed25519 key of {} bytes, not 32", bits.len())));
            }
            valid(bits)?;
            Ok(Key::Ed25519(bits.to_vec()))
        }
        Algorithm::Rsa => {
            let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = parsed.parsed() else {
                return Err(invalid("is not an RSA public key (modulus, exponent)"));
            };
            let trim = |b: &[u8]| b.iter().skip_while(|&&x| x == 0).copied().collect::<Vec<u8>>();
            let key = Key::Rsa {
                modulus: trim(rsa.modulus),
                exponent: trim(rsa.exponent),
                bits: rsa.key_size(),
            };
            if !(2048..=8192).contains(&rsa.key_size()) {
                return Err(invalid(&format!(
                    "is an RSA key of {} bits; an RSA key has 2048 to 8192 bits",
                    rsa.key_size()
                )));
            }
            // aws-lc checks the modulus size when it verifies, not when it parses.
            valid(bits)?;
            Ok(key)
        }
    }
}

/// Checks `spki` (DER) is a public key the issuer signs for: a real key in its accepted form, an RSA
/// key only with `accept_rsa`, and not one the issuer holds itself (`held`). Returns the key.
pub fn check(spki: &[u8], accept_rsa: bool, held: impl Fn(&Key) -> bool) -> Result<Key, IssuerError> {
    let key = parse(spki)?;
    if matches!(key, Key::Rsa { .. }) && !accept_rsa {
        return Err(invalid(
            "is an RSA key, which this trust domain does not certify; use an ECDSA P-256 or \
             Ed25519 key (or set `cluster.spec.ca.accept_rsa_keys: true`)",
        ));
    }
    if held(&key) {
        return Err(invalid(
            "is a key the issuer holds itself (a CA's, or one it signs or serves with)",
        ));
    }
    Ok(key)
}

/// Checks that the holder of the key of `spki` (a bot certificate's SubjectPublicKeyInfo) signed
/// `message`: ECDSA P-256 with SHA-256 (ASN.1), Ed25519, or RSA PKCS#1 v1.5 with SHA-256.
pub fn verify(spki: &[u8], message: &[u8], signature: &[u8]) -> Result<(), IssuerError> {
    let unreadable = || IssuerError::Unauthenticated("the certificate's public key cannot be read".into());
    let (_, parsed) = SubjectPublicKeyInfo::from_der(spki).map_err(|_| unreadable())?;
    let algorithm = Algorithm::of(&parsed.algorithm.algorithm).ok_or_else(unreadable)?;
    UnparsedPublicKey::new(algorithm.verification(), parsed.subject_public_key.data.as_ref())
        .verify(message, signature)
        .map_err(|_| IssuerError::Unauthenticated("the renewal was not signed with the certificate's key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn ec_spki(point: &[u8]) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
        let mut alg = vec![0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        alg.extend([0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
        let mut bits = vec![0x03, (point.len() + 1) as u8, 0x00];
        bits.extend(point);
        let mut out = vec![0x30, (alg.len() + bits.len()) as u8];
        out.extend(alg);
        out.extend(bits);
        out
    }

    /// An EC SubjectPublicKeyInfo whose bit string holds `bytes` (any length up to 255).
    fn ec_spki_long(bytes: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        alg.extend([0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
        let mut bits = vec![0x03, 0x81, (bytes.len() + 1) as u8, 0x00];
        bits.extend(bytes);
        let mut out = vec![0x30, 0x81, (alg.len() + bits.len()) as u8];
        out.extend(alg);
        out.extend(bits);
        out
    }

    #[test]
    fn only_real_keys_pass() {
        let good = rcgen::KeyPair::generate().unwrap().subject_public_key_info();
        assert!(check(&good, false, |_| false).is_ok());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .subject_public_key_info();
        assert!(check(&ed, false, |_| false).is_ok());
        // A point not on the curve, a 2-byte key, random bytes.
        let mut off_curve = vec![0x04];
        off_curve.extend([7u8; 64]);
        for bad in [ec_spki(&off_curve), ec_spki(&[0x04, 0x01]), vec![0x5a; 64]] {
            let why = check(&bad, false, |_| false).unwrap_err().to_string();
            assert!(why.contains("the public key"), "{why}");
        }
        // A 31-byte Ed25519 key.
        let mut short = ed.clone();
        short.truncate(ed.len() - 1);
        short[1] -= 1;
        short[ed.len() - 34] -= 1;
        assert!(check(&short, false, |_| false).is_err());
        // A CA's own key.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(ca.der()).unwrap();
        let held = parse(parsed.public_key().raw).unwrap();
        let why = check(&ca_key.subject_public_key_info(), false, |k| *k == held).unwrap_err();
        assert!(why.to_string().contains("a key the issuer holds"), "{why}");
        // The same point compressed, and a whole SubjectPublicKeyInfo inside the bit string.
        let point = parsed.public_key().subject_public_key.data.to_vec();
        let mut compressed = vec![0x02 + (point[64] & 1)];
        compressed.extend(&point[1..33]);
        assert!(check(&ec_spki(&compressed), false, |_| false).is_err());
        let nested = ec_spki_long(&ca_key.subject_public_key_info());
        assert!(check(&nested, false, |_| false).is_err());
        // RSA only where the cluster allows it, and then of 2048 bits or more.
        let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .unwrap()
            .subject_public_key_info();
        let why = check(&rsa, false, |_| false).unwrap_err().to_string();
        assert!(why.contains("accept_rsa_keys"), "{why}");
        assert!(check(&rsa, true, |_| false).is_ok());
        let why = check(&rsa_spki_of_bits(1024), true, |_| false).unwrap_err().to_string();
        assert!(why.contains("1024 bits"), "{why}");
    }

    /// An RSA SubjectPublicKeyInfo with a `bits`-bit modulus (odd, top bit set) and e = 65537.
    fn rsa_spki_of_bits(bits: usize) -> Vec<u8> {
        fn der(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match body.len() {
                n if n < 0x80 => out.push(n as u8),
                n if n < 0x100 => out.extend([0x81, n as u8]),
                n => out.extend([0x82, (n >> 8) as u8, n as u8]),
            }
            out.extend(body);
            out
        }
        let mut modulus = vec![0x00, 0x80];
        modulus.extend(vec![0x55; bits / 8 - 2]);
        modulus.push(0x01);
        let rsa_key = der(0x30, &[der(0x02, &modulus), der(0x02, &[0x01, 0x00, 0x01])].concat());
        let algorithm = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ];
        let mut bit_string = vec![0x00];
        bit_string.extend(rsa_key);
        der(0x30, &[algorithm.to_vec(), der(0x03, &bit_string)].concat())
    }
}
