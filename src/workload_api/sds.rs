//! Envoy's Secret Discovery Service (SDS v3) on every Workload API socket: `StreamSecrets` (state of
//! the world, with xDS versions, nonces, ACK and NACK) and `FetchSecrets`. Resource names as SPIRE
//! and Teleport's tbot serve them: `default`, a SPIFFE ID, `ROOTCA`, `ALL` and `spiffe://<trust
//! domain>`; an empty list asks for everything. The caller is attested like a Workload API caller
//! (Envoy sends no security header, and none is asked for).

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::follow::{Follow, Woke};
use super::listener::attested;
use super::server::{Made, OpenStream, Stream, Svids, Watch, WorkloadApi, into_stream, issued};
use crate::agent::{Slot, X509Material};
use crate::issuer::{Bundles, Resolved};

/// The generated SDS subset (from `proto/sds.proto`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("envoy.service.secret.v3");
}

use proto::secret_discovery_service_server::SecretDiscoveryService;
use proto::*;

/// The type of every resource SDS serves.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// The caller's default SVID.
pub const DEFAULT_SVID: &str = "default";
/// This trust domain's bundle.
pub const ROOT_CA: &str = "ROOTCA";
/// Every trust domain's bundle, in one SPIFFE validator.
pub const ALL_BUNDLES: &str = "ALL";

/// How validation contexts are written for this Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validation {
    /// Envoy's SPIFFE validator (`envoy.tls.cert_validator.spiffe`, Envoy 1.18 and later): the
    /// peer's trust domain picks its bundle.
    Spiffe,
    /// A plain `trusted_ca`: for Envoy before 1.18, or a node whose metadata sets
    /// `disable_spiffe_cert_validation` (as SPIRE allows).
    TrustedCa,
}

impl Validation {
    fn for_node(node: Option<&Node>) -> Validation {
        let Some(node) = node else { return Validation::Spiffe };
        let old = match &node.user_agent_version_type {
            Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => b
                .version
                .as_ref()
                .is_some_and(|v| (v.major_number, v.minor_number) < (1, 18)),
            _ => false,
        };
        let disabled = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("disable_spiffe_cert_validation"))
            .and_then(|v| v.kind.as_ref())
            .is_some_and(|kind| match kind {
                prost_types::value::Kind::BoolValue(b) => *b,
                prost_types::value::Kind::StringValue(s) => s.eq_ignore_ascii_case("true"),
                _ => false,
            });
        if old || disabled {
            Validation::TrustedCa
        } else {
            Validation::Spiffe
        }
    }
}

fn any(name: &str, secret: secret::Type) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE.into(),
        value: Secret {
            name: name.to_owned(),
            r#type: Some(secret),
        }
        .encode_to_vec(),
    }
}

fn inline(bytes: impl Into<Vec<u8>>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.into())),
    })
}

/// An SVID as a `TlsCertificate`: the leaf, then its chain, each in its own PEM block; the PKCS#8 key.
fn tls_certificate(name: &str, material: &X509Material) -> prost_types::Any {
    any(
        name,
        secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(crate::pem::certificates([&material.svid.certificate])),
            private_key: inline(crate::pem::private_key(&material.key)),
        }),
    )
}

/// A validation context trusting `bundles` (each entry: a trust domain and its CAs, DER), refusing
/// what `crls` (DER) revoke. Envoy refuses a chain that has a CRL for some of its CAs and not for
/// others, so the CRLs go only into a context of this trust domain alone (one CRL per CA of it).
fn validation_context(
    name: &str,
    bundles: &[(&str, &[Vec<u8>])],
    crls: &[Vec<u8>],
    mode: Validation,
) -> prost_types::Any {
    let crl = (!crls.is_empty()).then(|| {
        crls.iter()
            .map(|der| crate::pem::block("X509 CRL", der))
            .collect::<String>()
    });
    let mut context = match mode {
        Validation::TrustedCa => CertificateValidationContext {
            trusted_ca: inline(crate::pem::certificates(bundles.iter().flat_map(|(_, cas)| cas.iter()))),
            crl: None,
            custom_validator_config: None,
        },
        Validation::Spiffe => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: bundles
                    .iter()
                    .map(|(td, cas)| spiffe_cert_validator_config::TrustDomain {
                        name: (*td).to_owned(),
                        trust_bundle: inline(crate::pem::certificates(cas.iter())),
                    })
                    .collect(),
            };
            CertificateValidationContext {
                trusted_ca: None,
                crl: None,
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.into(),
                    typed_config: Some(prost_types::Any {
                        type_url: SPIFFE_VALIDATOR_TYPE.into(),
                        value: config.encode_to_vec(),
                    }),
                }),
            }
        }
    };
    context.crl = crl.and_then(inline);
    any(name, secret::Type::ValidationContext(context))
}

/// The secrets for `names` (empty: everything) from the caller's SVIDs and the bundle; `None` while
/// an SVID is still being issued.
fn secrets(
    slots: &[tokio::sync::watch::Receiver<Slot>],
    bundles: &Bundles,
    names: &BTreeSet<String>,
    mode: Validation,
) -> Option<Result<Vec<prost_types::Any>, Status>> {
    let ready = match issued(slots)? {
        Ok(ready) => ready,
        Err(status) => return Some(Err(status)),
    };
    let own = format!("spiffe://{}", bundles.trust_domain);
    let crls: &[Vec<u8>] = &bundles.crls;
    let ours: [(&str, &[Vec<u8>]); 1] = [(bundles.trust_domain.as_str(), &bundles.x509_authorities)];
    // Every trust domain, this one first.
    let all: Vec<(&str, &[Vec<u8>])> = ours
        .iter()
        .copied()
        .chain(
            bundles
                .federated
                .values()
                .map(|b| (b.trust_domain.as_str(), b.x509_authorities.as_slice())),
        )
        .collect();
    if names.is_empty() {
        let mut out: Vec<_> = ready.iter().map(|m| tls_certificate(&m.svid.spiffe_id, m)).collect();
        out.push(validation_context(&own, &ours, crls, mode));
        return Some(Ok(out));
    }
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for name in names {
        match name.as_str() {
            DEFAULT_SVID => out.push(tls_certificate(name, &ready[0])),
            ROOT_CA => out.push(validation_context(name, &ours, crls, mode)),
            ALL_BUNDLES if mode == Validation::TrustedCa => {
                return Some(Err(Status::failed_precondition(
                    "`ALL` needs Envoy's SPIFFE certificate validator (Envoy 1.18 or later, and no \
                     `disable_spiffe_cert_validation` in the node metadata); ask for `ROOTCA` instead",
                )));
            }
            // One entry per trust domain, this one first.
            ALL_BUNDLES => {
                let crls = if all.len() == 1 { crls } else { &[] };
                out.push(validation_context(name, &all, crls, mode))
            }
            name if name == own => out.push(validation_context(name, &ours, crls, mode)),
            name if name
                .strip_prefix("spiffe://")
                .is_some_and(|td| bundles.federated.contains_key(td)) =>
            {
                let td = &name["spiffe://".len()..];
                let cas = &bundles.federated[td].x509_authorities;
                out.push(validation_context(name, &[(td, cas.as_slice())], &[], mode));
            }
            name => match ready.iter().find(|m| m.svid.spiffe_id == name) {
                Some(m) => out.push(tls_certificate(name, m)),
                None => unknown.push(name.to_owned()),
            },
        }
    }
    if !unknown.is_empty() {
        let mut mine: Vec<String> = ready.iter().map(|m| format!("`{}`", m.svid.spiffe_id)).collect();
        mine.extend([DEFAULT_SVID, ROOT_CA, ALL_BUNDLES, &own].map(|n| format!("`{n}`")));
        return Some(Err(Status::invalid_argument(format!(
            "workload is not authorized for the requested identities {unknown:?}: this caller may ask for {}; \
             fix the secret names in Envoy's `sds_config`, or the workload identity's rules",
            mine.join(", ")
        ))));
    }
    Some(Ok(out))
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this server serves only `{SECRET_TYPE}`, not `{type_url}`"
        )))
    }
}

/// The requested names as a set (order and repeats do not matter; an empty name is dropped).
fn name_set(names: Vec<String>) -> BTreeSet<String> {
    names.into_iter().filter(|n| !n.is_empty()).collect()
}

/// 4 random bytes in hex, as SPIRE and tbot make nonces.
fn nonce() -> String {
    let mut bytes = [0u8; 4];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
    crate::hex(&bytes)
}

/// What woke an open SDS stream.
enum Event {
    Request(Box<Result<Option<DiscoveryRequest>, Status>>),
    Changed,
}

/// An open `StreamSecrets` stream.
struct SdsWatch {
    follow: Follow,
    /// `None` once the client has half-closed: no more requests, but changes are still pushed.
    inbound: Option<Streaming<DiscoveryRequest>>,
    first: Option<(Vec<Resolved>, Duration)>,
    svids: Option<Svids>,
    /// The names of the last request (`None` before the first request).
    names: Option<BTreeSet<String>>,
    node: Option<Node>,
    /// A response is owed now (the first request, a change of names).
    owed: bool,
    /// The SVIDs or the bundle may have changed since the last response.
    dirty: bool,
    last_sent: Option<Made>,
    nonce: String,
    version: u64,
    open: OpenStream,
}

impl SdsWatch {
    /// Takes in one request: the first one is answered; later ones are answered only when they
    /// change the names. A stale nonce is ignored; a NACK is logged and not answered (the next
    /// change is).
    fn request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        check_type(&request.type_url)?;
        if request.node.is_some() {
            self.node = request.node;
        }
        let names = name_set(request.resource_names);
        if self.names.is_none() {
            self.names = Some(names);
            self.owed = true;
            return Ok(());
        }
        if !request.response_nonce.is_empty() && request.response_nonce != self.nonce {
            tracing::debug!(nonce = %request.response_nonce, "SDS request with a stale nonce; ignored");
            return Ok(());
        }
        if let Some(error) = &request.error_detail {
            self.open.0.errors.count("sds_nack");
            // Escaped: these strings come from the client.
            tracing::warn!(
                code = error.code,
                error = %error.message.escape_debug(),
                version = %request.version_info.escape_debug(),
                rejected = self.version,
                node = %self.node.as_ref().map(|n| n.id.as_str()).unwrap_or("").escape_debug(),
                "Envoy rejected the secrets (NACK); they are not sent again until an SVID or the bundle changes"
            );
        }
        if self.names.as_ref() != Some(&names) {
            self.names = Some(names);
            self.owed = true;
        }
        Ok(())
    }

    /// The response owed now, if any can be made.
    fn respond(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        let svids = self.svids.as_ref()?;
        let names = self.names.as_ref()?;
        if !self.owed && !self.dirty {
            return None;
        }
        let made = svids.made();
        if !self.owed && self.last_sent.as_ref().is_some_and(|last| last.same_as(&made)) {
            self.dirty = false;
            return None;
        }
        let mode = Validation::for_node(self.node.as_ref());
        match secrets(&svids.slots, &made.bundles, names, mode)? {
            Err(status) => Some(Err(status)),
            Ok(resources) => {
                self.owed = false;
                self.dirty = false;
                self.last_sent = Some(made);
                self.version += 1;
                self.nonce = nonce();
                Some(Ok(DiscoveryResponse {
                    version_info: self.version.to_string(),
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: self.nonce.clone(),
                }))
            }
        }
    }
}

impl Watch for SdsWatch {
    type Item = DiscoveryResponse;

    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        loop {
            if self.svids.is_none() {
                match Svids::subscribe(&self.follow, self.first.take()).await {
                    Ok(svids) => self.svids = Some(svids),
                    Err(status) => return Some(Err(status)),
                }
                self.dirty = true;
            }
            if let Some(response) = self.respond() {
                return Some(response);
            }
            let (inbound, svids) = (&mut self.inbound, self.svids.as_mut().expect("subscribed"));
            let event = async {
                let request = async {
                    match inbound {
                        Some(inbound) => inbound.message().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = request => Some(Event::Request(Box::new(message))),
                    changed = svids.changes.next() => changed.map(|_| Event::Changed),
                }
            };
            match self.follow.wake(event).await {
                Woke::Data(Event::Request(message)) => match *message {
                    Ok(Some(request)) => {
                        if let Err(status) = self.request(request) {
                            return Some(Err(status));
                        }
                    }
                    // The client half-closed: it sends nothing more, and still gets every change.
                    Ok(None) if self.names.is_some() => self.inbound = None,
                    // It went away, or closed before asking for anything.
                    _ => return None,
                },
                Woke::Data(Event::Changed) => self.dirty = true,
                Woke::Resolve => self.svids = None,
                Woke::Stop => return None,
            }
        }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for WorkloadApi {
    type StreamSecretsStream = Stream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let workload = attested(&request)?;
        let follow = Follow::new(self, workload);
        let first = follow.resolve().await?;
        Ok(Response::new(into_stream(SdsWatch {
            follow,
            inbound: Some(request.into_inner()),
            first: Some(first),
            svids: None,
            names: None,
            node: None,
            owed: false,
            dirty: false,
            last_sent: None,
            nonce: String::new(),
            version: 0,
            open: OpenStream::new(&self.metrics),
        })))
    }

    async fn fetch_secrets(&self, request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let workload = attested(&request)?;
        let request = request.into_inner();
        check_type(&request.type_url)?;
        let mut follow = Follow::new(self, workload);
        let mut svids = Svids::subscribe(&follow, None).await?;
        let names = name_set(request.resource_names);
        let mode = Validation::for_node(request.node.as_ref());
        loop {
            let made = svids.made();
            if let Some(resources) = secrets(&svids.slots, &made.bundles, &names, mode) {
                return Ok(Response::new(DiscoveryResponse {
                    version_info: String::new(),
                    resources: resources?,
                    type_url: SECRET_TYPE.into(),
                    nonce: String::new(),
                }));
            }
            match follow.wake(svids.changes.next()).await {
                Woke::Data(_) => {}
                Woke::Resolve => svids = Svids::subscribe(&follow, None).await?,
                Woke::Stop => return Err(Status::unavailable("tbot is stopping; ask again")),
            }
        }
    }
}
