//! The `issuer` document (v1): this host serves the issuer API to agents on other hosts.

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agent::server_host;
use super::{Metadata, Problem, vocabulary};

vocabulary! {
    /// `kind: issuer`.
    IssuerKind { Issuer = "issuer" }
}

vocabulary! {
    /// The issuer schema version.
    IssuerVersion { V1 = "v1" }
}

vocabulary! {
    /// Where the issuer keeps its CA, JWT key and ledgers.
    IssuerStorageType {
        /// Files under `path` (keys `0600`).
        Directory = "directory",
        /// Nothing persisted: a restart makes a new CA (for tests).
        Memory = "memory",
        /// An etcd cluster shared by every replica of the trust domain; private keys sealed with
        /// `key_encryption_key_file` before they reach it.
        Etcd = "etcd",
    }
}

/// An issuer replica: where it listens and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    pub kind: IssuerKind,
    pub version: IssuerVersion,
    /// `name` names this replica in logs and status.
    pub metadata: Metadata,
    pub spec: IssuerSpec,
}

/// The issuer API's address, names and storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    /// Where the issuer API (gRPC over TLS) listens, such as `0.0.0.0:3025`.
    pub listen: SocketAddr,
    /// The names and addresses agents reach it by (`issuer.example.com:3025`, `10.0.0.5`): they go in
    /// its serving certificate. Agents set one of them as `proxy_server`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_addrs: Vec<String>,
    /// Where the CA, JWT key and ledgers are kept.
    pub storage: IssuerStorage,
    /// Every connection comes through a TCP balancer that sends a PROXY protocol v2 header
    /// (haproxy `send-proxy-v2`, AWS NLB proxy protocol v2): the agent's address is read from it,
    /// for the per-address join limit and `tbotctl get bot`. Only with every path through such a
    /// balancer: a direct connection is refused, and a header from anyone else would be believed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// Path of the admin socket `tbotctl` talks to; defaults to `<storage path>/admin.sock` (an
    /// agent config in the same directory names it instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    /// Serve this trust domain's SPIFFE bundle to the domains that federate with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<BundleEndpoint>,
}

vocabulary! {
    /// How the bundle endpoint authenticates itself (SPIFFE Federation §5).
    BundleProfile {
        /// Its own X509-SVID, `spiffe://<trust domain>/tbot/bundle-endpoint`.
        HttpsSpiffe = "https_spiffe",
        /// A WebPKI certificate from `cert_file` and `key_file`.
        HttpsWeb = "https_web",
    }
}

/// The SPIFFE bundle endpoint: HTTPS, every path answered with the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpoint {
    /// Such as `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// `https_spiffe` or `https_web`.
    pub profile: BundleProfile,
    /// `spiffe_refresh_hint`: how often the other domains should fetch (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_hint: Option<super::Duration>,
    /// `https_web`: the certificate chain (PEM), re-read when the file changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// `https_web`: its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl BundleEndpoint {
    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let files = [("cert_file", &self.cert_file), ("key_file", &self.key_file)];
        match self.profile {
            BundleProfile::HttpsWeb => {
                for (name, file) in files {
                    match file {
                        None => out.push(
                            Problem::error("/spec/bundle_endpoint", format!("`https_web` needs `{name}`"))
                                .hint("give the PEM certificate chain and key the endpoint serves, such as one from your ACME client"),
                        ),
                        Some(p) if p.is_relative() => out.push(Problem::error(
                            format!("/spec/bundle_endpoint/{name}"),
                            format!("`{}` is not an absolute path", p.display()),
                        )),
                        Some(_) => {}
                    }
                }
            }
            BundleProfile::HttpsSpiffe => {
                for (name, file) in files {
                    if file.is_some() {
                        out.push(
                            Problem::error(
                                format!("/spec/bundle_endpoint/{name}"),
                                format!("`{name}` is only for the `https_web` profile"),
                            )
                            .hint("`https_spiffe` serves the issuer's own SVID; remove the file, or set `profile: https_web`"),
                        );
                    }
                }
            }
        }
        out
    }
}

/// The issuer's storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerStorage {
    /// `directory`, `memory` or `etcd`.
    #[serde(rename = "type")]
    pub kind: IssuerStorageType,
    /// The directory, for `directory` storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The etcd cluster's client URLs, for `etcd` storage (`http://10.0.0.1:2379`, or `https://`
    /// with `tls`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Every key goes under this prefix (`etcd`); default `/tbot`. Trust domains sharing one
    /// cluster may share it: keys are per trust domain below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A file of exactly 32 random bytes (`head -c 32 /dev/urandom > issuer.kek`, mode 0600), the
    /// same on every replica: CA and JWT private keys are sealed with it (AES-256-GCM) before they
    /// reach etcd. Required for `etcd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_encryption_key_file: Option<PathBuf>,
    /// Client TLS to etcd (PEM files), optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTlsFiles>,
}

/// Client TLS to etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsFiles {
    /// The CA that signs the etcd members' certificates; default the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// This replica's client certificate, when etcd asks for one (with `key_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl IssuerStorage {
    /// The default etcd key prefix.
    pub const DEFAULT_PREFIX: &str = "/tbot";
}

impl IssuerStorage {
    /// Checks of the storage block: each type's fields, and only those.
    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let absolute = |out: &mut Vec<Problem>, at: &str, path: &std::path::Path, example: &str| {
            if path.is_relative() {
                out.push(
                    Problem::error(
                        format!("/spec/storage/{at}"),
                        format!("`{}` is not an absolute path", path.display()),
                    )
                    .hint(format!("write an absolute path, such as `{example}`")),
                );
            }
        };
        match (self.kind, &self.path) {
            (IssuerStorageType::Directory, None) => out.push(
                Problem::error("/spec/storage", "`directory` storage needs a `path`")
                    .hint("set `path: /var/lib/tbot/issuer`"),
            ),
            (IssuerStorageType::Directory, Some(p)) => absolute(&mut out, "path", p, "/var/lib/tbot/issuer"),
            (_, Some(_)) => out.push(
                Problem::error("/spec/storage/path", "`path` is only for `type: directory` storage")
                    .hint("remove `path`, or set `type: directory`"),
            ),
            _ => {}
        }
        if self.kind != IssuerStorageType::Etcd {
            let etcd_only = [
                ("endpoints", !self.endpoints.is_empty()),
                ("prefix", self.prefix.is_some()),
                ("key_encryption_key_file", self.key_encryption_key_file.is_some()),
                ("tls", self.tls.is_some()),
            ];
            for (field, set) in etcd_only {
                if set {
                    out.push(
                        Problem::error(
                            format!("/spec/storage/{field}"),
                            format!("`{field}` is only for `type: etcd` storage"),
                        )
                        .hint(format!("remove `{field}`, or set `type: etcd`")),
                    );
                }
            }
            return out;
        }
        if self.endpoints.is_empty() {
            out.push(
                Problem::error(
                    "/spec/storage",
                    "`etcd` storage needs `endpoints`, the etcd cluster's client URLs",
                )
                .hint(
                    "set `endpoints: [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]`",
                ),
            );
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            let host = endpoint.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            if !scheme_ok || host.is_empty() || host.contains('/') && !host.ends_with('/') {
                out.push(
                    Problem::error(
                        format!("/spec/storage/endpoints/{i}"),
                        format!("`{endpoint}` is not an etcd client URL"),
                    )
                    .hint("write `http://host:2379` (or `https://host:2379` with `tls`)"),
                );
            }
        }
        if let Some(prefix) = &self.prefix
            && (!prefix.starts_with('/') || prefix.len() < 2)
        {
            out.push(
                Problem::error("/spec/storage/prefix", format!("`{prefix}` is not a key prefix"))
                    .hint("write a prefix that starts with `/`, such as `/tbot`"),
            );
        }
        match &self.key_encryption_key_file {
            None => out.push(
                Problem::error(
                    "/spec/storage",
                    "`etcd` storage needs `key_encryption_key_file`: CA and JWT private keys are sealed with it before they reach etcd",
                )
                .hint("make one with `head -c 32 /dev/urandom > /etc/tbot/issuer.kek && chmod 600 /etc/tbot/issuer.kek`, copy it to every replica, and set `key_encryption_key_file: /etc/tbot/issuer.kek`"),
            ),
            Some(p) => absolute(&mut out, "key_encryption_key_file", p, "/etc/tbot/issuer.kek"),
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(path) = path {
                    absolute(&mut out, &format!("tls/{field}"), path, "/etc/tbot/etcd-client.pem");
                }
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                out.push(
                    Problem::error("/spec/storage/tls", "`cert_file` and `key_file` go together")
                        .hint("set both (a client certificate and its key), or neither"),
                );
            }
        }
        out
    }
}

impl Issuer {
    /// Checks that hold within the document itself.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (i, addr) in self.spec.public_addrs.iter().enumerate() {
            if let Err(message) = server_host(addr) {
                out.push(
                    Problem::error(format!("/spec/public_addrs/{i}"), message)
                        .hint("write `host:port` or `host`, such as `issuer.example.com:3025`"),
                );
            }
        }
        out.extend(self.spec.storage.problems());
        if let Some(endpoint) = &self.spec.bundle_endpoint {
            out.extend(endpoint.problems());
            if endpoint.listen.port() == self.spec.listen.port()
                && (endpoint.listen.ip() == self.spec.listen.ip()
                    || endpoint.listen.ip().is_unspecified()
                    || self.spec.listen.ip().is_unspecified())
            {
                out.push(
                    Problem::error(
                        "/spec/bundle_endpoint/listen",
                        format!(
                            "the bundle endpoint's `listen` ({}) is the issuer API's port ({}): one of them could not bind",
                            endpoint.listen, self.spec.listen
                        ),
                    )
                    .hint("give the bundle endpoint its own port, such as 8443"),
                );
            }
        }
        if self.spec.admin_socket.as_ref().is_some_and(|p| p.is_relative()) {
            out.push(Problem::error(
                "/spec/admin_socket",
                "the admin socket path is not absolute",
            ));
        }
        out
    }

    /// The host names and IP addresses for the serving certificate: `public_addrs` without ports,
    /// and `listen`'s IP when it is a specific one.
    pub fn serving_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .spec
            .public_addrs
            .iter()
            .filter_map(|a| server_host(a).ok())
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .collect();
        let ip = self.spec.listen.ip();
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
        if names.is_empty() {
            names.push("localhost".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }

    /// Where `tbotctl` finds this issuer's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        if let Some(path) = &self.spec.admin_socket {
            return path.clone();
        }
        match (&self.spec.storage.path, self.spec.storage.kind) {
            (Some(path), IssuerStorageType::Directory) => path.join("admin.sock"),
            _ => PathBuf::from("/run/tbot/issuer-admin.sock"),
        }
    }
}
