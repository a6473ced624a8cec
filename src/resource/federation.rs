//! The `spiffe_federation` document (v1, Teleport's kind): trust another SPIFFE trust domain, whose
//! bundle comes from its bundle endpoint (`https_web` or `https_spiffe`) or is written here (`static`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spiffe_id::TrustDomain;
use super::{Metadata, Problem, vocabulary};

vocabulary! {
    /// `kind: spiffe_federation`.
    FederationKind { SpiffeFederation = "spiffe_federation" }
}

vocabulary! {
    /// The spiffe_federation schema version.
    FederationVersion { V1 = "v1" }
}

/// Trust in one foreign trust domain. `metadata.name` is that trust domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpiffeFederation {
    pub kind: FederationKind,
    pub version: FederationVersion,
    /// `name` is the foreign trust domain, such as `partner.example.org`.
    pub metadata: Metadata,
    pub spec: FederationSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// Where the foreign bundle comes from: exactly one of `https_web`, `https_spiffe`, `static`.
    pub bundle_source: BundleSource,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleSource {
    /// The endpoint has a WebPKI certificate (checked against `ca_file`, or the Mozilla roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_web: Option<HttpsWeb>,
    /// The endpoint presents an X509-SVID of the foreign trust domain, checked against that
    /// domain's last bundle (at first `bootstrap_bundle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_spiffe: Option<HttpsSpiffe>,
    /// The bundle itself, as SPIFFE bundle JSON.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub fixed: Option<StaticBundle>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpsWeb {
    /// `https://host[:port]/path`.
    pub bundle_endpoint_url: String,
    /// PEM CA certificates that sign the endpoint's certificate; else the Mozilla root store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpsSpiffe {
    /// `https://host[:port]/path`.
    pub bundle_endpoint_url: String,
    /// The SPIFFE ID the endpoint's X509-SVID must carry, in the foreign trust domain.
    pub endpoint_spiffe_id: String,
    /// The foreign domain's bundle (SPIFFE bundle JSON) to trust the endpoint with at first; after
    /// that, each fetched bundle authenticates the next fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_bundle: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticBundle {
    /// SPIFFE bundle JSON.
    pub bundle: String,
}

fn https_url_problem(url: &str, at: &str) -> Option<Problem> {
    let rest = url.strip_prefix("https://")?;
    let host = rest.split('/').next().unwrap_or_default();
    (host.is_empty() || host.contains('@') || host.contains(' ')).then(|| {
        Problem::error(at, format!("`{url}` has no host"))
            .hint("write `https://host[:port]/path`, such as `https://partner.example.org:8443/bundle.json`")
    })
}

impl SpiffeFederation {
    pub fn trust_domain(&self) -> Result<TrustDomain, String> {
        TrustDomain::parse(&self.metadata.name)
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let td = match self.trust_domain() {
            Ok(td) => Some(td),
            Err(message) => {
                out.push(
                    Problem::error("/metadata/name", message)
                        .hint("the document's name is the foreign trust domain, such as `partner.example.org`"),
                );
                None
            }
        };
        let source = &self.spec.bundle_source;
        let given = [
            source.https_web.is_some(),
            source.https_spiffe.is_some(),
            source.fixed.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            out.push(
                Problem::error(
                    "/spec/bundle_source",
                    format!("{given} bundle sources are set; exactly one is needed"),
                )
                .hint("keep one of `https_web`, `https_spiffe` and `static`"),
            );
        }
        let url = |url: &str, at: &str, out: &mut Vec<Problem>| {
            if !url.starts_with("https://") {
                out.push(
                    Problem::error(at, format!("`{url}` is not an `https://` URL"))
                        .hint("bundle endpoints are served over HTTPS; write `https://host[:port]/path`"),
                );
            } else if let Some(p) = https_url_problem(url, at) {
                out.push(p);
            }
        };
        if let Some(web) = &source.https_web {
            url(
                &web.bundle_endpoint_url,
                "/spec/bundle_source/https_web/bundle_endpoint_url",
                &mut out,
            );
            if web.ca_file.as_ref().is_some_and(|p| p.is_relative()) {
                out.push(Problem::error(
                    "/spec/bundle_source/https_web/ca_file",
                    "`ca_file` is not an absolute path",
                ));
            }
        }
        if let Some(spiffe) = &source.https_spiffe {
            url(
                &spiffe.bundle_endpoint_url,
                "/spec/bundle_source/https_spiffe/bundle_endpoint_url",
                &mut out,
            );
            let at = "/spec/bundle_source/https_spiffe/endpoint_spiffe_id";
            match spiffe.endpoint_spiffe_id.strip_prefix("spiffe://") {
                Some(rest)
                    if td
                        .as_ref()
                        .is_some_and(|td| rest.split('/').next() == Some(td.as_str())) => {}
                _ => out.push(
                    Problem::error(
                        at,
                        format!(
                            "`{}` is not a SPIFFE ID in trust domain `{}`",
                            spiffe.endpoint_spiffe_id, self.metadata.name
                        ),
                    )
                    .hint(format!(
                        "the endpoint's SVID belongs to the foreign domain: `spiffe://{}/…` (tbot serves \
                         `spiffe://{}/tbot/bundle-endpoint`)",
                        self.metadata.name, self.metadata.name
                    )),
                ),
            }
            if let Some(bundle) = &spiffe.bootstrap_bundle
                && let Err(why) = crate::spiffe_bundle::parse(bundle.as_bytes())
            {
                out.push(
                    Problem::error("/spec/bundle_source/https_spiffe/bootstrap_bundle", why)
                        .hint("paste the foreign domain's bundle as its endpoint serves it (`curl` it once)"),
                );
            }
        }
        if let Some(fixed) = &source.fixed {
            match crate::spiffe_bundle::parse(fixed.bundle.as_bytes()) {
                Err(why) => out.push(
                    Problem::error("/spec/bundle_source/static/bundle", why)
                        .hint("write the foreign domain's bundle as SPIFFE bundle JSON (a JWK Set)"),
                ),
                // A bundle of no CA and no JWT key trusts nothing: a mistake, never a choice.
                Ok(parsed) if parsed.x509_authorities.is_empty() && parsed.jwt_keys.is_empty() => out.push(
                    Problem::error(
                        "/spec/bundle_source/static/bundle",
                        "the bundle holds no `x509-svid` or `jwt-svid` key: it trusts nothing",
                    )
                    .hint("copy the foreign domain's bundle as its bundle endpoint serves it"),
                ),
                Ok(_) => {}
            }
        }
        out
    }
}
