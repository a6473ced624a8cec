//! The `revocation` document (v1): certificates the issuer's CRL lists from now on, because their
//! keys leaked. It ends by itself: at `metadata.expires` when given, else once every certificate it
//! names has expired (the issuance log knows when).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Metadata, Problem, string_form, vocabulary};

vocabulary! {
    /// `kind: revocation`.
    RevocationKind { Revocation = "revocation" }
}

vocabulary! {
    /// The revocation schema version.
    RevocationVersion { V1 = "v1" }
}

/// Certificates to refuse before they expire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub kind: RevocationKind,
    pub version: RevocationVersion,
    pub metadata: Metadata,
    pub spec: RevocationSpec,
}

/// What is revoked, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevocationSpec {
    /// Why, for whoever reads it later ("laptop stolen", "key in a public repository").
    pub reason: String,
    /// The serial numbers of the X509-SVIDs and bot certificates to revoke, in hex, as `tbotctl get
    /// svids` and `openssl x509 -serial` print them (either case; `:` separators allowed).
    pub serials: Vec<Serial>,
}

/// A certificate serial number: hex digits (at most 20 bytes), kept in lower case without `:` or
/// leading zeros.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(String);

string_form!(
    Serial,
    "tbot-serial",
    "A certificate serial number in hex, such as `4a7d0c…` (either case, `:` separators allowed)."
);

impl Serial {
    pub fn parse(s: &str) -> Result<Serial, String> {
        let digits: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
        if digits.is_empty() {
            return Err("a serial number must not be empty".into());
        }
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(format!(
                "`{}` is not a hex serial number: {c:?} is not a hex digit",
                s.escape_debug()
            ));
        }
        let trimmed = digits.trim_start_matches('0');
        let value = if trimmed.is_empty() { "0" } else { trimmed };
        if value.len() > 40 {
            return Err(format!(
                "a serial number is at most 20 bytes (40 hex digits); this one has {}",
                value.len()
            ));
        }
        Ok(Serial(value.to_owned()))
    }

    /// The serial's value as big-endian bytes (no sign byte: a DER writer adds one when needed).
    pub fn to_bytes(&self) -> Vec<u8> {
        let padded = if self.0.len() % 2 == 1 {
            format!("0{}", self.0)
        } else {
            self.0.clone()
        };
        (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).expect("checked hex"))
            .collect()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Revocation {
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.spec.reason.trim().is_empty() {
            out.push(
                Problem::error("/spec/reason", "`reason` is empty")
                    .hint("say why, for whoever reads the revocation later (\"key in a public repository\")"),
            );
        }
        if self.spec.serials.is_empty() {
            out.push(
                Problem::error("/spec/serials", "`serials` is empty: this revocation revokes nothing")
                    .hint("list the serial numbers `tbotctl get svids` prints"),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_in_every_spelling_openssl_and_tbotctl_use() {
        let want = Serial::parse("4a7d0c").unwrap();
        for spelling in ["4A7D0C", "4a:7d:0c", "004a7d0c", "4A:7D:0C"] {
            assert_eq!(Serial::parse(spelling).unwrap(), want, "{spelling}");
        }
        assert_eq!(want.to_bytes(), [0x4a, 0x7d, 0x0c]);
        assert_eq!(Serial::parse("ff01").unwrap().to_bytes(), [0xff, 0x01]);
        assert_eq!(Serial::parse("abc").unwrap().to_bytes(), [0x0a, 0xbc]);
        assert!(Serial::parse("xyz").unwrap_err().contains("not a hex digit"));
        assert!(Serial::parse(&"1".repeat(41)).unwrap_err().contains("at most 20 bytes"));
        assert!(Serial::parse("").is_err());
    }
}
