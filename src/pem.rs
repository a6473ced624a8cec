//! PEM text (RFC 7468): one block per DER object, base64 in 64-character lines. Envoy, nginx and
//! OpenSSL read a chain as consecutive blocks, never as one block holding several certificates.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// One PEM block with `label` (`CERTIFICATE`, `PRIVATE KEY`).
pub fn block(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Certificates, each in its own `CERTIFICATE` block, in order.
pub fn certificates<'a>(ders: impl IntoIterator<Item = &'a Vec<u8>>) -> String {
    ders.into_iter().map(|der| block("CERTIFICATE", der)).collect()
}

/// A PKCS#8 private key (`PRIVATE KEY`).
pub fn private_key(pkcs8: &[u8]) -> String {
    block("PRIVATE KEY", pkcs8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_wrap_at_64_and_round_trip_through_rustls() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let (a, b) = (vec![1u8; 100], vec![2u8; 48]);
        let text = certificates([&a, &b]);
        assert!(text.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        let parsed: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(parsed, vec![a, b]);
    }
}
