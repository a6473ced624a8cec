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
    /// Path of the admin socket `tbotctl` talks to; defaults to `<storage path>/admin.sock` (an
    /// agent config in the same directory names it instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
}

/// The issuer's storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerStorage {
    /// `directory` or `memory`.
    #[serde(rename = "type")]
    pub kind: IssuerStorageType,
    /// The directory, for `directory` storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
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
        match (self.spec.storage.kind, &self.spec.storage.path) {
            (IssuerStorageType::Directory, None) => out.push(
                Problem::error("/spec/storage", "`directory` storage needs a `path`")
                    .hint("set `path: /var/lib/tbot/issuer`"),
            ),
            (IssuerStorageType::Directory, Some(p)) if p.is_relative() => out.push(
                Problem::error(
                    "/spec/storage/path",
                    format!("`{}` is not an absolute path", p.display()),
                )
                .hint("write an absolute path, such as `/var/lib/tbot/issuer`"),
            ),
            (IssuerStorageType::Memory, Some(_)) => out.push(
                Problem::error("/spec/storage/path", "`path` is only for `type: directory` storage")
                    .hint("remove `path`, or set `type: directory`"),
            ),
            _ => {}
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
        match &self.spec.storage.path {
            Some(path) => path.join("admin.sock"),
            None => PathBuf::from("/run/tbot/issuer-admin.sock"),
        }
    }
}
