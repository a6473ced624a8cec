//! The bodies of the fuzz targets in `fuzz/` (`cargo +nightly fuzz run load|template|spiffe_id|issuer_request`).
//! Each takes arbitrary bytes and must not panic; where a parse succeeds it also checks what must
//! then hold. `tests/fuzz_regressions.rs` runs every input in `fuzz/regressions/` and the seed
//! corpus through them on stable, so a crash once found stays fixed.

use std::path::Path;

use crate::manifest;
use crate::resource::spiffe_id::{MAX_ID_LEN, SpiffeId, TrustDomain};
use crate::resource::template::Template;

/// The document loader: bytes in, diagnostics out (each rendered as `tbotctl validate` prints it),
/// never a panic; every diagnostic names the file and a line inside it.
pub fn load(data: &[u8]) {
    let path = Path::new("fuzz.yaml");
    let loaded = manifest::load_bytes(path, data.to_vec());
    // As YAML counts them (LF, CR LF, lone CR), plus one for a position just past the end.
    let text = String::from_utf8_lossy(data);
    let lines = manifest::yaml::source_lines(&text).count() + 1;
    for d in &loaded.diagnostics {
        assert_eq!(d.location.path, path, "{d:?}");
        if let Some(pos) = d.location.pos {
            assert!(pos.line as usize <= lines, "line {} of {lines}: {d:?}", pos.line);
        }
        std::hint::black_box(crate::manifest::render::diagnostic(d));
    }
    if !loaded.has_errors() {
        for object in loaded.state.objects.values() {
            assert_eq!(object.hash, manifest::canonical_hash(&object.document));
        }
    }
}

/// The template parser: a template that parses prints back as written and renders with every
/// attribute set.
pub fn template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(template) = Template::parse(text) else { return };
    assert_eq!(template.to_string(), text);
    let rendered = template
        .render(|attribute| Some(format!("<{attribute}>")))
        .expect("every attribute is set");
    std::hint::black_box(rendered);
}

/// The SPIFFE ID parser: an ID that parses prints back as written, fits the length limit, and its
/// trust domain parses alone.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(id) = SpiffeId::parse(text) else { return };
    assert_eq!(id.to_string(), text);
    assert!(text.len() <= MAX_ID_LEN);
    assert!(TrustDomain::parse(id.trust_domain().as_str()).is_ok());
    assert!(id.path().is_empty() || id.path().starts_with('/'));
}

/// The issuer API's request decoding and handling: the first byte picks a message, the rest is its
/// protobuf encoding. A request that decodes goes through the real handler of an in-process issuer
/// (with a joined bot's certificate as the TLS client certificate); answers sent to agents decode
/// through the client's conversions. Nothing may panic; every refusal is a gRPC status; whatever is
/// granted is an ID the bot may have (never the denied `db`'s) and signed for a real key.
pub fn issuer_request(data: &[u8]) {
    std::hint::black_box(issuer_request_outcome(data));
}

/// [`issuer_request`], saying what the handler answered: `None` when the input is no request (it
/// does not decode, or picks a message agents receive), else the gRPC code (`Ok` when granted).
pub fn issuer_request_outcome(data: &[u8]) -> Option<tonic::Code> {
    use futures_util::FutureExt;
    use prost::Message;

    use crate::issuer::Issuer;
    use crate::issuer::server::tls::PeerInfo;
    use crate::issuer::wire::{self, proto};
    use proto::bot_service_server::BotService;
    use proto::workload_identity_service_server::WorkloadIdentityService;

    let (&which, body) = data.split_first()?;
    let (api, issuer, cert) = fuzz_issuer();
    // The TLS session of an agent that joined, as the server sees it.
    let peer = PeerInfo::new(
        "127.0.0.1:1".parse().expect("an address"),
        Some(std::sync::Arc::from(cert.as_slice())),
    );
    fn request<T>(message: T, peer: &PeerInfo) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.extensions_mut().insert(peer.clone());
        r
    }
    fn code<T>(answer: Option<Result<T, tonic::Status>>) -> Option<tonic::Code> {
        answer.map(|a| a.map_or_else(|s| s.code(), |_| tonic::Code::Ok))
    }
    match which % 8 {
        0 => {
            let m = proto::ResolveRequest::decode(body).ok()?;
            let answer = api.resolve(request(m, &peer)).now_or_never();
            if let Some(Ok(answer)) = &answer {
                for resolved in &answer.get_ref().identities {
                    assert_ne!(resolved.name, "db", "a denied identity resolved");
                }
            }
            code(answer)
        }
        1 => {
            let m = proto::IssueX509Request::decode(body).ok()?;
            let key = m.public_key.clone();
            let answer = api.issue_x509(request(m, &peer)).now_or_never();
            if let Some(Ok(svid)) = &answer {
                let svid = svid.get_ref();
                assert_granted(&svid.spiffe_id);
                assert_certified_as_sent(&svid.certificate, &key);
            }
            code(answer)
        }
        2 => {
            let m = proto::IssueJwtRequest::decode(body).ok()?;
            let answer = api.issue_jwt(request(m, &peer)).now_or_never();
            if let Some(Ok(svid)) = &answer {
                assert_granted(&svid.get_ref().spiffe_id);
            }
            code(answer)
        }
        3 => {
            // Without the bot's private key no renewal passes its proof: this checks the refusals.
            let m = proto::RenewRequest::decode(body).ok()?;
            code(api.renew(request(m, &peer)).now_or_never())
        }
        4 => {
            // A `token` join (the `iam` one needs STS): the server's checks, then the issuer's.
            let Ok(proto::JoinRequest {
                request: Some(proto::join_request::Request::Init(init)),
            }) = proto::JoinRequest::decode(body)
            else {
                return None;
            };
            let request = match crate::issuer::server::token_join_request(init, &peer) {
                Ok(request) => request,
                Err(e) => return Some(crate::issuer::wire::to_status(&e).code()),
            };
            let key = request.public_key.clone();
            let answer = issuer.join(request).now_or_never();
            if let Some(Ok(joined)) = &answer {
                assert_certified_as_sent(&joined.der, &key);
            }
            answer.map(|a| a.map_or_else(|e| crate::issuer::wire::to_status(&e).code(), |_| tonic::Code::Ok))
        }
        5 => {
            if let Ok(m) = proto::BotCertificate::decode(body) {
                let _ = wire::bot_from_wire(m);
            }
            None
        }
        6 => {
            if let Ok(m) = proto::WatchUpdate::decode(body)
                && let Some(b) = m.bundle
            {
                let _ = wire::bundle_from_wire(b);
            }
            None
        }
        _ => {
            if let Ok(m) = proto::X509Svid::decode(body) {
                let _ = wire::x509_from_wire(m);
            }
            if let Ok(m) = proto::JwtSvid::decode(body) {
                let _ = wire::jwt_from_wire(m);
            }
            None
        }
    }
}

/// What the fuzz issuer's bot may hold: `wi`'s ID, `/u/<uid>`, one segment of decimal digits. The
/// bot's role denies `db` (`/u/<uid>/db`), which a value holding a `/` would make.
fn assert_granted(spiffe_id: &str) {
    let uid = spiffe_id
        .strip_prefix("spiffe://example.org/u/")
        .unwrap_or_else(|| panic!("an ID the bot may not have: {spiffe_id}"));
    assert!(
        !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()),
        "a uid that is not a number: {spiffe_id}"
    );
}

/// A certificate the issuer signed carries exactly the key sent, in a form every verifier reads the
/// same way: an uncompressed P-256 point (65 bytes, `04 …`) or a 32-byte Ed25519 key. Checked here
/// with x509-parser alone, apart from `issuer::keys::public`, the code under test.
fn assert_certified_as_sent(certificate: &[u8], sent: &[u8]) {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate).expect("the issuer signs DER");
    let spki = cert.public_key();
    assert_eq!(spki.raw, sent, "the certificate's key is not the one sent");
    let bits = spki.subject_public_key.data.as_ref();
    let shape_ok = match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.2.1" => bits.len() == 65 && bits[0] == 0x04,
        "1.3.101.112" => bits.len() == 32,
        _ => false,
    };
    assert!(shape_ok, "signed for a key of another form: {sent:02x?}");
}

/// An in-process issuer with a bot joined by token, shared by every fuzz input.
fn fuzz_issuer() -> &'static (
    crate::issuer::server::IssuerApi,
    std::sync::Arc<crate::issuer::LocalIssuer>,
    Vec<u8>,
) {
    use std::sync::{Arc, OnceLock};

    use futures_util::FutureExt;

    use crate::issuer::server::IssuerApi;
    use crate::issuer::server::limits::Rate;
    use crate::issuer::{Issuer, JoinProof, JoinRequest, LocalIssuer};

    static ISSUER: OnceLock<(IssuerApi, Arc<LocalIssuer>, Vec<u8>)> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let policy = crate::testing::examples::policy_from_text(crate::testing::examples::EXAMPLE_DOCUMENTS);
        let issuer = Arc::new(
            LocalIssuer::open(crate::store::Store::memory(), policy)
                .now_or_never()
                .expect("an in-memory issuer opens at once")
                .expect("an issuer"),
        );
        let key = rcgen::KeyPair::generate().expect("a key");
        let joined = issuer
            .join(JoinRequest {
                token: "t".into(),
                public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
                proof: JoinProof::Token,
                ttl: std::time::Duration::from_secs(3600),
                current: None,
                address: String::new(),
            })
            .now_or_never()
            .expect("an in-process join completes at once")
            .expect("the join succeeds");
        let unlimited = Rate {
            burst: 1e12,
            per_second: 1e12,
        };
        let api = IssuerApi::with_limits(issuer.clone(), unlimited, unlimited);
        (api, issuer, joined.der)
    })
}
