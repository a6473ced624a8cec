//! What the issuer signs a certificate for: only a real public key. A bot sends the
//! SubjectPublicKeyInfo of the key it holds; it is parsed and checked (a P-256 point on the curve,
//! an Ed25519 key of 32 bytes, and RSA of 2048 to 8192 bits only where `cluster.spec.ca.accept_rsa_keys`
//! allows it) before anything is recorded or signed, and a CA's own key is refused.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ED25519, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::issuer::IssuerError;

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const P256: &str = "1.2.840.10045.3.1.7";
const ED25519_OID: &str = "1.3.101.112";
const RSA: &str = "1.2.840.113549.1.1.1";

/// Checks `spki` (DER) is a public key the issuer signs for; `ca_keys` are the CAs' public keys
/// (their `subjectPublicKey` bits, held in memory: nothing is parsed per call), never certified again;
/// RSA keys pass only with `accept_rsa`.
pub fn check(spki: &[u8], ca_keys: &[&[u8]], accept_rsa: bool) -> Result<(), IssuerError> {
    let invalid = |why: &str| IssuerError::Invalid(format!("the public key {why}"));
    let (rest, parsed) =
        SubjectPublicKeyInfo::from_der(spki).map_err(|_| invalid("is not a DER SubjectPublicKeyInfo"))?;
    if !rest.is_empty() {
        return Err(invalid("has bytes after its SubjectPublicKeyInfo"));
    }
    let algorithm = parsed.algorithm.algorithm.to_id_string();
    let key = parsed.subject_public_key.data.as_ref();
    let checked = match algorithm.as_str() {
        EC_PUBLIC_KEY => {
            let curve = parsed
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            if curve.as_deref() != Some(P256) {
                return Err(invalid("is an EC key of another curve than P-256"));
            }
            ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key).map(|_| ())
        }
        ED25519_OID => ParsedPublicKey::new(&ED25519, key).map(|_| ()),
        RSA if !accept_rsa => {
            return Err(invalid(
                "is an RSA key, which this trust domain does not certify; use an ECDSA P-256 or \
                 Ed25519 key (or set `cluster.spec.ca.accept_rsa_keys: true`)",
            ));
        }
        RSA => {
            // aws-lc checks the modulus size when it verifies, not when it parses.
            let bits = match parsed.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
                _ => 0,
            };
            if !(2048..=8192).contains(&bits) {
                return Err(invalid(&format!(
                    "is an RSA key of {bits} bits; an RSA key has 2048 to 8192 bits"
                )));
            }
            ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key).map(|_| ())
        }
        other => {
            return Err(invalid(&format!(
                "has algorithm {other}; use an ECDSA P-256 or Ed25519 key"
            )));
        }
    };
    checked.map_err(|e| invalid(&format!("is not a valid key of its algorithm ({e})")))?;
    if ca_keys.contains(&key) {
        return Err(invalid("is a CA's own key"));
    }
    Ok(())
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

    #[test]
    fn only_real_keys_pass() {
        let good = rcgen::KeyPair::generate().unwrap().subject_public_key_info();
        assert!(check(&good, &[], false).is_ok());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .subject_public_key_info();
        assert!(check(&ed, &[], false).is_ok());
        // A point not on the curve, a 2-byte key, random bytes.
        let mut off_curve = vec![0x04];
        off_curve.extend([7u8; 64]);
        for bad in [ec_spki(&off_curve), ec_spki(&[0x04, 0x01]), vec![0x5a; 64]] {
            let why = check(&bad, &[], false).unwrap_err().to_string();
            assert!(why.contains("the public key"), "{why}");
        }
        // A 31-byte Ed25519 key.
        let mut short = ed.clone();
        short.truncate(ed.len() - 1);
        short[1] -= 1;
        short[ed.len() - 34] -= 1;
        assert!(check(&short, &[], false).is_err());
        // A CA's own key.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(ca.der()).unwrap();
        let ca_raw = parsed.public_key().subject_public_key.data.to_vec();
        let why = check(&ca_key.subject_public_key_info(), &[ca_raw.as_slice()], false).unwrap_err();
        assert!(why.to_string().contains("a CA's own key"), "{why}");
        // RSA only where the cluster allows it, and then of 2048 bits or more.
        let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .unwrap()
            .subject_public_key_info();
        let why = check(&rsa, &[], false).unwrap_err().to_string();
        assert!(why.contains("accept_rsa_keys"), "{why}");
        assert!(check(&rsa, &[], true).is_ok());
        let why = check(&rsa_spki_of_bits(1024), &[], true).unwrap_err().to_string();
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
