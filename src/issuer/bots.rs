//! Bot identities: the X.509 client certificate naming the bot, its roles, its join attributes and
//! its renewal generation; reading such a certificate back; and the persisted ledgers of consumed
//! tokens and of each bot's generation (a mismatch means a copied identity and locks the bot).

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose,
    SubjectPublicKeyInfo,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::oid_registry::Oid;

use super::ca::{Authority, random_serial};
use super::{Attributes, BotCertificate, IssuerError};
use crate::store::{Secrecy, Store};

/// The (unregistered, private) OID of the extension holding a bot certificate's claims as JSON.
pub const CLAIMS_OID: &[u64] = &[1, 3, 9999, 77, 1];
/// The longest a bot certificate lives.
pub const MAX_BOT_TTL: Duration = Duration::from_secs(24 * 3600);

/// What a bot certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotClaims {
    pub bot: String,
    pub roles: Vec<String>,
    pub generation: u64,
    /// `join.meta.*` and `join.iam.*` attribute values.
    pub join: BTreeMap<String, String>,
    /// The bot instance the join made (empty in certificates from before instances).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

impl BotClaims {
    /// The ledger key of the certificate's bot instance.
    pub fn instance_key(&self) -> String {
        instance_key(&self.bot, &self.instance)
    }

    pub fn join_attributes(&self) -> Attributes {
        let mut attrs = Attributes::new();
        for (k, v) in &self.join {
            attrs.set(k.clone(), v);
        }
        attrs
    }
}

/// DER UTF8String of `text`.
fn der_utf8(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = vec![0x0c];
    match bytes.len() {
        n @ 0..=127 => out.push(n as u8),
        n @ 128..=255 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(bytes);
    out
}

fn der_utf8_parse(der: &[u8]) -> Option<&str> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = match first {
        n @ 0..=127 => (n as usize, rest),
        0x81 => (*rest.first()? as usize, &rest[1..]),
        0x82 => ((*rest.first()? as usize) << 8 | *rest.get(1)? as usize, rest.get(2..)?),
        _ => return None,
    };
    std::str::from_utf8(body.get(..len)?).ok()
}

/// Signs a bot certificate for `public_key` (SPKI DER) with the active CA.
pub fn sign_bot_certificate(
    authority: &Authority,
    claims: &BotClaims,
    public_key: &[u8],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<BotCertificate, IssuerError> {
    let key = SubjectPublicKeyInfo::from_der(public_key)
        .map_err(|e| IssuerError::Invalid(format!("the bot's public key is not a DER SubjectPublicKeyInfo: {e}")))?;
    let not_after = (now + ttl.min(MAX_BOT_TTL)).min(authority.active().not_after());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tbot bot");
    dn.push(DnType::CommonName, claims.bot.as_str());
    params.distinguished_name = dn;
    super::ca::end_entity(&mut params, public_key);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = not_after;
    let json = serde_json::to_string(claims).expect("claims serialize");
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(CLAIMS_OID, der_utf8(&json)));
    let cert = params
        .signed_by(&key, authority.active().issuer())
        .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    Ok(BotCertificate {
        der: cert.der().to_vec(),
        bot: claims.bot.clone(),
        roles: claims.roles.clone(),
        generation: claims.generation,
        not_after,
        join: claims.join_attributes(),
        instance: claims.instance.clone(),
    })
}

/// A bot certificate that one of our CAs signed.
#[derive(Debug, Clone)]
pub struct VerifiedBot {
    pub claims: BotClaims,
    /// The certificate's SubjectPublicKeyInfo (DER).
    pub public_key: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// Checks that one of our CAs signed `der`, that it is valid now, and reads its claims and public key.
pub fn verify_bot_certificate(
    authority: &Authority,
    der: &[u8],
    now: OffsetDateTime,
) -> Result<VerifiedBot, IssuerError> {
    let unauthenticated = |why: &str| IssuerError::Unauthenticated(why.to_owned());
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| unauthenticated("not an X.509 certificate"))?;
    if authority.signer_of(&cert).is_none() {
        return Err(unauthenticated("no CA of this trust domain signed it"));
    }
    let validity = cert.validity();
    if now < validity.not_before.to_datetime() || now > validity.not_after.to_datetime() {
        return Err(unauthenticated("it has expired or is not valid yet"));
    }
    let oid = Oid::from(CLAIMS_OID).expect("a valid OID");
    let extension = cert
        .get_extension_unique(&oid)
        .ok()
        .flatten()
        .ok_or_else(|| unauthenticated("it is not a bot certificate"))?;
    let claims = der_utf8_parse(extension.value)
        .and_then(|json| serde_json::from_str::<BotClaims>(json).ok())
        .ok_or_else(|| unauthenticated("its bot claims cannot be read"))?;
    Ok(VerifiedBot {
        claims,
        public_key: cert.public_key().raw.to_vec(),
        not_after: validity.not_after.to_datetime(),
    })
}

/// One bot instance's renewal state (one per join: a hundred hosts joining as one bot are a
/// hundred instances, each with its own generation and lock).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BotRecord {
    pub generation: u64,
    /// What `tbotctl get bot/<name>` shows about the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<InstanceInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<String>,
    /// SHA-256 (hex) of the public key the current generation was signed for: a renewal that
    /// presents the previous generation with this same key is the holder retrying after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where and how an instance joined, and when it last renewed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub bot: String,
    pub join_method: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iam_arn: String,
    /// The address it joined or last renewed from (empty in process).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// RFC 3339.
    pub joined_at: String,
    /// RFC 3339, empty until the first renewal.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_renewal: String,
    /// When its certificate expires (Unix seconds): an instance expired for a day is forgotten.
    pub not_after: i64,
}

/// The ledger key of a bot instance: `<bot>/<instance>` (the bot's name alone for certificates from
/// before instances).
pub fn instance_key(bot: &str, instance: &str) -> String {
    if instance.is_empty() {
        bot.to_owned()
    } else {
        format!("{bot}/{instance}")
    }
}

/// A new instance ID: 16 random hex digits.
pub fn new_instance_id() -> Result<String, IssuerError> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IssuerError::Crypto("the random generator failed".into()))?;
    Ok(crate::hex(&bytes))
}

/// A consumed single-use token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Consumed {
    pub bot: String,
    /// RFC 3339.
    pub at: String,
    /// SHA-256 (hex) of the joiner's public key: only that key may retry a join whose answer was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The instance the join made: a retry of that join re-signs for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// The consumed tokens and the bot instances of a trust domain, one small file each
/// (`tokens/<sha256>.json`, `bots/<bot>@<instance>.json`): a join writes its own records, not
/// every instance's (a fleet of thousands joins in O(1) per join).
#[derive(Debug, Default)]
pub struct Ledger {
    dir: String,
    /// By instance key ([`instance_key`]).
    pub bots: BTreeMap<String, BotRecord>,
    /// By SHA-256 (hex) of the token name: the name is the secret and never stored.
    pub tokens: BTreeMap<String, Consumed>,
}

/// The key under which a token's consumption is recorded.
pub fn token_key(name: &str) -> String {
    crate::sha256_hex(name.as_bytes())
}

impl Ledger {
    pub fn load(store: &Store, dir: String) -> Result<Ledger, IssuerError> {
        let mut ledger = Ledger {
            dir,
            ..Ledger::default()
        };
        for name in store.list(&format!("{}/bots", ledger.dir))? {
            let key = record_key(&name).replace('@', "/");
            if let Some(record) = store.read_json(&name)? {
                ledger.bots.insert(key, record);
            }
        }
        for name in store.list(&format!("{}/tokens", ledger.dir))? {
            if let Some(consumed) = store.read_json(&name)? {
                ledger.tokens.insert(record_key(&name), consumed);
            }
        }
        // The one-file-per-ledger layout of earlier versions: moved to one file per record.
        let (bots_file, tokens_file) = (
            format!("{}/bots.json", ledger.dir),
            format!("{}/tokens.json", ledger.dir),
        );
        let old_bots: Option<BTreeMap<String, BotRecord>> = store.read_json(&bots_file)?;
        let old_tokens: Option<BTreeMap<String, Consumed>> = store.read_json(&tokens_file)?;
        for (key, consumed) in old_tokens.into_iter().flatten() {
            if !ledger.tokens.contains_key(&key) {
                ledger.put_token(store, key, consumed)?;
            }
        }
        for (key, record) in old_bots.into_iter().flatten() {
            if !ledger.bots.contains_key(&key) {
                ledger.put_bot(store, key, record)?;
            }
        }
        store.remove(&tokens_file)?;
        store.remove(&bots_file)?;
        Ok(ledger)
    }

    /// Records a bot instance's state.
    pub fn put_bot(&mut self, store: &Store, key: String, record: BotRecord) -> Result<(), IssuerError> {
        store.write_json(&self.bot_file(&key), &record, Secrecy::Public)?;
        self.bots.insert(key, record);
        Ok(())
    }

    /// Forgets a bot instance.
    pub fn remove_bot(&mut self, store: &Store, key: &str) -> Result<(), IssuerError> {
        store.remove(&self.bot_file(key))?;
        self.bots.remove(key);
        Ok(())
    }

    /// Records a token as consumed.
    pub fn put_token(&mut self, store: &Store, key: String, consumed: Consumed) -> Result<(), IssuerError> {
        store.write_json(&format!("{}/tokens/{key}.json", self.dir), &consumed, Secrecy::Public)?;
        self.tokens.insert(key, consumed);
        Ok(())
    }

    fn bot_file(&self, key: &str) -> String {
        format!("{}/bots/{}.json", self.dir, key.replace('/', "@"))
    }
}

/// The key a record file stands for: its name without the directory and `.json`.
fn record_key(name: &str) -> String {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.strip_suffix(".json").unwrap_or(file).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_of_one_file_each_moves_to_one_file_per_record() {
        let store = Store::memory();
        let mut bots = BTreeMap::new();
        bots.insert(
            "web-bot".to_owned(),
            BotRecord {
                generation: 3,
                ..BotRecord::default()
            },
        );
        let mut tokens = BTreeMap::new();
        tokens.insert(
            token_key("t"),
            Consumed {
                bot: "web-bot".into(),
                at: "2026-01-01T00:00:00Z".into(),
                key: None,
                instance: None,
            },
        );
        store.write_json("issuer/x/bots.json", &bots, Secrecy::Public).unwrap();
        store
            .write_json("issuer/x/tokens.json", &tokens, Secrecy::Public)
            .unwrap();
        let mut ledger = Ledger::load(&store, "issuer/x".into()).unwrap();
        assert_eq!(ledger.bots["web-bot"].generation, 3);
        assert!(ledger.tokens.contains_key(&token_key("t")));
        assert_eq!(store.read("issuer/x/bots.json").unwrap(), None, "the old file is gone");
        let key = instance_key("web-bot", "00ff");
        ledger.put_bot(&store, key.clone(), BotRecord::default()).unwrap();
        let again = Ledger::load(&store, "issuer/x".into()).unwrap();
        assert_eq!(again.bots.len(), 2);
        assert!(again.bots.contains_key(&key), "{:?}", again.bots.keys());
        assert_eq!(store.list("issuer/x/bots").unwrap().len(), 2);
    }

    #[test]
    fn utf8_strings_round_trip_at_every_length_form() {
        for len in [0, 5, 127, 128, 255, 256, 5000] {
            let text = "x".repeat(len);
            assert_eq!(der_utf8_parse(&der_utf8(&text)), Some(text.as_str()), "length {len}");
        }
    }
}
