//! Bot identities: the X.509 client certificate naming the bot, its roles, its join attributes and
//! its renewal generation; reading such a certificate back; and the persisted ledgers of consumed
//! tokens and of each bot's generation (a mismatch means a copied identity and locks the bot).

pub mod join;

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose,
    SubjectPublicKeyInfo,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::Oid;

use crate::issuer::keys::ca::{Authority, random_serial};
use crate::issuer::state::backing::{Backing, json};
use crate::issuer::{Attributes, BotCertificate, IssuerError};
use crate::kv::{Condition, Op};

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
    pub join: JoinClaims,
    /// The bot instance the join made (empty in certificates from before instances).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

/// A bot certificate's join attribute values by name (a JSON object in the certificate), sorted by
/// name in one vector: a certificate carries one (`token`) to four (`iam`), and the issuer keeps
/// the claims of every certificate it has verified, where a map's first node took 0.5 KiB.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinClaims(Vec<(String, String)>);

impl JoinClaims {
    pub fn get(&self, name: &str) -> Option<&String> {
        let at = self.0.binary_search_by(|(k, _)| k.as_str().cmp(name)).ok()?;
        Some(&self.0[at].1)
    }

    /// By name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// As a map built from the same pairs would have it: sorted, the last value of a repeated name.
impl FromIterator<(String, String)> for JoinClaims {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        JoinClaims(pairs.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect())
    }
}

impl IntoIterator for JoinClaims {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<const N: usize> From<[(String, String); N]> for JoinClaims {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Serialize for JoinClaims {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for JoinClaims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, String>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

impl BotClaims {
    /// The ledger key of the certificate's bot instance.
    pub fn instance_key(&self) -> String {
        instance_key(&self.bot, &self.instance)
    }

    /// The join's attributes for templates and rules; a `token` join's token name is not one (it is
    /// the secret: a certificate of an earlier version may still carry it).
    pub fn join_attributes(&self) -> Attributes {
        let mut attrs = Attributes::new();
        self.add_join_attributes(&mut attrs);
        attrs
    }

    /// Sets the join's attributes ([`BotClaims::join_attributes`]) in `attrs`, with no map between.
    pub fn add_join_attributes(&self, attrs: &mut Attributes) {
        for (k, _) in self.join.iter() {
            if let Some(v) = self.join_attribute(k) {
                attrs.set(k.clone(), v);
            }
        }
    }

    /// One of the join's attributes ([`BotClaims::join_attributes`]) by name.
    pub fn join_attribute(&self, name: &str) -> Option<&String> {
        if name == TOKEN_NAME_CLAIM && self.join.get("join.meta.join_method").is_some_and(|m| m == "token") {
            return None;
        }
        self.join.get(name)
    }
}

/// The join claim that names the token (kept for `iam` joins, whose token name is not a secret).
pub const TOKEN_NAME_CLAIM: &str = "join.meta.join_token_name";

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
) -> Result<crate::issuer::keys::mint::Minted<BotCertificate>, IssuerError> {
    let key = SubjectPublicKeyInfo::from_der(public_key)
        .map_err(|e| IssuerError::Invalid(format!("the bot's public key is not a DER SubjectPublicKeyInfo: {e}")))?;
    let not_after = (now + ttl.min(MAX_BOT_TTL)).min(authority.active().not_after());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tbot bot");
    dn.push(DnType::CommonName, claims.bot.as_str());
    params.distinguished_name = dn;
    crate::issuer::keys::mint::end_entity(&mut params, public_key);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let serial = random_serial()?;
    let serial_hex = crate::hex(serial.as_ref());
    params.serial_number = Some(serial);
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = not_after;
    let json = serde_json::to_string(claims).expect("claims serialize");
    params
        .custom_extensions
        .push(CustomExtension::from_oid_content(CLAIMS_OID, der_utf8(&json)));
    let cert = params
        .signed_by(&key, authority.active().issuer())
        .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    Ok(crate::issuer::keys::mint::Minted {
        made: BotCertificate {
            der: cert.der().to_vec(),
            bot: claims.bot.clone(),
            roles: claims.roles.clone(),
            generation: claims.generation,
            not_after,
            join: claims.join_attributes(),
            instance: claims.instance.clone(),
        },
        serial: serial_hex,
    })
}

/// A bot certificate that one of our CAs signed.
#[derive(Debug, Clone)]
pub struct VerifiedBot {
    pub claims: BotClaims,
    /// The certificate's SubjectPublicKeyInfo (DER).
    pub public_key: Vec<u8>,
    pub not_after: OffsetDateTime,
    /// The id of the CA that signed it.
    pub signer: u32,
}

/// Checks that one of our CAs signed `der`, that it is valid now, and reads its claims and public key.
pub fn verify_bot_certificate(
    authority: &Authority,
    der: &[u8],
    now: OffsetDateTime,
) -> Result<VerifiedBot, IssuerError> {
    let (_, cert) = parse(der)?;
    let Some(ca) = authority.signer_of(&cert) else {
        return Err(IssuerError::Unauthenticated(
            "no CA of this trust domain signed it".into(),
        ));
    };
    read(&cert, ca.id(), now)
}

/// What [`verify_bot_certificate`] returns for the certificate [`sign_bot_certificate`] has just
/// signed for `claims` and `public_key` with CA `signer`, from what was signed: nothing is parsed
/// again. The certificate holds its expiry in whole seconds.
pub fn verified_at_signing(
    claims: &BotClaims,
    public_key: &[u8],
    not_after: OffsetDateTime,
    signer: u32,
) -> VerifiedBot {
    VerifiedBot {
        claims: claims.clone(),
        public_key: public_key.to_vec(),
        not_after: not_after.replace_nanosecond(0).expect("0 is a valid nanosecond"),
        signer,
    }
}

fn parse(der: &[u8]) -> Result<(&[u8], X509Certificate<'_>), IssuerError> {
    x509_parser::parse_x509_certificate(der)
        .map_err(|_| IssuerError::Unauthenticated("not an X.509 certificate".into()))
}

/// The dates and claims of a bot certificate whose signature is known to be good.
fn read(cert: &X509Certificate<'_>, signer: u32, now: OffsetDateTime) -> Result<VerifiedBot, IssuerError> {
    let unauthenticated = |why: &str| IssuerError::Unauthenticated(why.to_owned());
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
        signer,
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
    /// The generation the last renewal replaced, and until when (Unix seconds) it may still issue
    /// (not renew): the agent publishes its new certificate a moment after the generation moved,
    /// and issuance in that moment, on any replica, must not fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<(u64, i64)>,
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
    crate::issuer::keys::unique(&mut bytes)?;
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

/// Where a bot instance's record lives: `<dir>/bots/<bot>@<instance>.json` (one key per record: a
/// join writes its own records, not every instance's, so a fleet of thousands joins in O(1) each).
pub fn bot_record_key(dir: &str, instance_key: &str) -> String {
    format!("{dir}/bots/{}.json", instance_key.replace('/', "@"))
}

/// Where a consumed token is recorded: `<dir>/tokens/<sha256 of the name>.json`.
pub fn token_record_key(dir: &str, token_key: &str) -> String {
    format!("{dir}/tokens/{token_key}.json")
}

/// The instance key a bot record key stands for.
pub fn instance_of_record(dir: &str, key: &str) -> Option<String> {
    let file = key.strip_prefix(dir)?.strip_prefix("/bots/")?.strip_suffix(".json")?;
    Some(file.replace('@', "/"))
}

/// The key under which a token's consumption is recorded.
pub fn token_key(name: &str) -> String {
    crate::sha256_hex(name.as_bytes())
}

/// Moves the one-file ledgers of earlier versions (`bots.json`, `tokens.json`) to one key per
/// record, keeping records that already exist.
pub async fn migrate_ledgers(backing: &Backing, dir: &str) -> Result<(), IssuerError> {
    let (bots_file, tokens_file) = (format!("{dir}/bots.json"), format!("{dir}/tokens.json"));
    let old_bots: Option<(BTreeMap<String, BotRecord>, i64)> = backing.get_json(&bots_file).await?;
    let old_tokens: Option<(BTreeMap<String, Consumed>, i64)> = backing.get_json(&tokens_file).await?;
    if old_bots.is_none() && old_tokens.is_none() {
        return Ok(());
    }
    let records = (old_tokens.map(|(t, _)| t).unwrap_or_default().into_iter())
        .map(|(key, consumed)| (token_record_key(dir, &key), json(&consumed)))
        .chain(
            (old_bots.map(|(b, _)| b).unwrap_or_default().into_iter())
                .map(|(key, record)| (bot_record_key(dir, &key), json(&record))),
        );
    for (name, value) in records {
        backing
            .kv
            .txn(vec![Condition::Absent(name.clone())], vec![Op::put(&name, value)])
            .await?;
    }
    backing
        .kv
        .txn(vec![], vec![Op::Delete(bots_file), Op::Delete(tokens_file)])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ledger_of_one_file_each_moves_to_one_key_per_record() {
        let backing = Backing::local(crate::store::Store::memory()).unwrap();
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
        let put = vec![
            Op::put("issuer/x/bots.json", json(&bots)),
            Op::put("issuer/x/tokens.json", json(&tokens)),
        ];
        backing.kv.txn(vec![], put).await.unwrap();
        migrate_ledgers(&backing, "issuer/x").await.unwrap();
        let (record, _) = backing
            .get_json::<BotRecord>(&bot_record_key("issuer/x", "web-bot"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.generation, 3);
        let token = token_record_key("issuer/x", &token_key("t"));
        assert!(backing.kv.get(&token).await.unwrap().is_some());
        assert_eq!(
            backing.kv.get("issuer/x/bots.json").await.unwrap(),
            None,
            "the old file is gone"
        );
        let key = bot_record_key("issuer/x", &instance_key("web-bot", "00ff"));
        assert_eq!(key, "issuer/x/bots/web-bot@00ff.json");
        assert_eq!(instance_of_record("issuer/x", &key).unwrap(), "web-bot/00ff");
    }

    #[tokio::test]
    async fn what_is_remembered_at_signing_is_what_verifying_the_certificate_reads() {
        let backing = Backing::local(crate::store::Store::memory()).unwrap();
        let domain = crate::resource::spiffe_id::TrustDomain::parse("example.org").unwrap();
        let now = OffsetDateTime::now_utc();
        let authority = Authority::load_or_create(&backing, &domain, &Default::default(), now)
            .await
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let claims = BotClaims {
            bot: "web".into(),
            roles: vec!["r".into()],
            generation: 4,
            join: [
                ("join.meta.join_method".to_owned(), "iam".to_owned()),
                ("join.iam.account".to_owned(), "1".to_owned()),
            ]
            .into(),
            instance: "00ff".into(),
        };
        // A time with a fraction of a second, as an issuer's clock gives.
        let now = now.replace_nanosecond(123_456_789).unwrap();
        let signed = sign_bot_certificate(&authority, &claims, &spki, Duration::from_secs(3600), now).unwrap();
        let read = verify_bot_certificate(&authority, &signed.made.der, now).unwrap();
        let remembered = verified_at_signing(&claims, &spki, signed.made.not_after, authority.active().id());
        assert_eq!(remembered.claims, read.claims);
        assert_eq!(remembered.public_key, read.public_key);
        assert_eq!(remembered.not_after, read.not_after);
        assert_eq!(remembered.signer, read.signer);
    }

    #[test]
    fn utf8_strings_round_trip_at_every_length_form() {
        for len in [0, 5, 127, 128, 255, 256, 5000] {
            let text = "x".repeat(len);
            assert_eq!(der_utf8_parse(&der_utf8(&text)), Some(text.as_str()), "length {len}");
        }
    }

    #[test]
    fn join_claims_read_and_write_the_json_object_a_map_did() {
        let pairs = [
            ("join.meta.join_method".to_owned(), "iam".to_owned()),
            ("join.iam.arn".to_owned(), "arn:aws:sts::1:assumed-role/r/i".to_owned()),
            ("join.iam.account".to_owned(), "1".to_owned()),
        ];
        let claims = JoinClaims::from(pairs.clone());
        let map: BTreeMap<String, String> = pairs.into_iter().collect();
        let json = serde_json::to_string(&claims).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        let back: JoinClaims = serde_json::from_str(&json).unwrap();
        assert_eq!(back, claims);
        // Sorted by name, whatever order the object had.
        let unsorted: JoinClaims = serde_json::from_str(r#"{"b":"2","a":"1"}"#).unwrap();
        assert_eq!(unsorted.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(claims.get("join.iam.account").map(String::as_str), Some("1"));
        assert_eq!(claims.get("join.meta.join_method").map(String::as_str), Some("iam"));
        assert_eq!(claims.get("join.iam"), None);
        // A repeated name keeps its last value, as a map did.
        let repeated: JoinClaims = [("a".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())].into();
        assert_eq!(repeated.get("a").map(String::as_str), Some("2"));
        assert_eq!(repeated.iter().count(), 1);
    }
}
