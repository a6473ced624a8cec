//! The agent config (`tbot.yaml`, `version: v2`): what this host's agent does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod service;

use super::{Duration, Problem, vocabulary};
use service::service_fields;
pub use service::*;

/// The longest credential a bot or service may be given.
pub const MAX_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

vocabulary! {
    /// The agent config's schema version.
    AgentVersion { V2 = "v2" }
}

vocabulary! {
    /// How the bot proves itself when it joins.
    JoinMethod {
        /// A secret token, single use for bots.
        Token = "token",
        /// A signed AWS STS `GetCallerIdentity` request (EC2 instance roles, IRSA).
        Iam = "iam",
    }
}

vocabulary! {
    /// Where the agent keeps its state.
    StorageType {
        /// Files under `path`.
        Directory = "directory",
        /// Nothing persisted; a restart joins again.
        Memory = "memory",
    }
}

/// The agent config: the one document without a `kind`, exactly one per directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The config schema version; `v2`.
    pub version: AgentVersion,
    /// Log at debug level.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug: bool,
    /// The Teleport Proxy Service address (`example.teleport.sh:443`); its host is the trust domain
    /// unless a `cluster` document names one. Set this or `auth_server`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_server: Option<String>,
    /// The Auth Service address (`auth.example.com:3025`). Set this or `proxy_server`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_server: Option<String>,
    /// How the bot joins.
    pub onboarding: Onboarding,
    /// Where state is kept; defaults to `directory` at `/var/lib/teleport/bot`.
    #[serde(default)]
    pub storage: Storage,
    /// Lifetime of the bot's certificate and of issued SVIDs (default `1h`, at most `24h`).
    #[serde(default = "default_credential_ttl")]
    pub credential_ttl: Duration,
    /// How often the bot's identity is renewed (default `20m`); must be shorter than `credential_ttl`.
    #[serde(default = "default_renewal_interval")]
    pub renewal_interval: Duration,
    /// What this agent serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Address of the diagnostics HTTP endpoint (`127.0.0.1:3001`): `/livez`, `/readyz`, `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diag_addr: Option<SocketAddr>,
    /// Path of the admin socket `tbotctl` talks to; defaults to `<storage path>/admin.sock`
    /// (`/run/tbot/admin.sock` for memory storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
}

fn default_credential_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_renewal_interval() -> Duration {
    Duration::from_secs(20 * 60)
}

/// How the bot joins its issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Onboarding {
    /// `token` or `iam`; must match the token's `join_method`.
    pub join_method: JoinMethod,
    /// The name of the `token` to join with (for `token` joins, the secret itself).
    pub token: String,
    /// The remote issuer's CA pins, `sha256:<hex of the CA certificate's SubjectPublicKeyInfo>`
    /// (`tbotctl status` on the issuer prints it): checked inside the first TLS handshake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_pins: Vec<String>,
    /// A PEM file with the remote issuer's CA certificate, instead of or beside `ca_pins`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_path: Option<PathBuf>,
    /// Trust whatever issuer answers at `proxy_server` (no pin, no CA file). Never in production:
    /// anyone on the network path can impersonate the issuer. Logged loudly at every start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// Checks a CA pin's form: `sha256:` and 64 hex digits.
pub fn check_pin(pin: &str) -> Result<(), String> {
    let Some(hex) = pin.strip_prefix("sha256:") else {
        return Err(format!("`{pin}` is not a CA pin: a pin starts with `sha256:`"));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{pin}` is not a CA pin: after `sha256:` come 64 hex digits ({} here)",
            hex.len()
        ));
    }
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "`{pin}` has upper-case hex digits; pins are written in lower case, as `tbotctl status` prints them: `sha256:{}`",
            hex.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// Where the agent keeps its CA, identity and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// `directory` (default) or `memory`.
    #[serde(rename = "type")]
    pub kind: StorageType,
    /// The directory, for `directory` storage; defaults to `/var/lib/teleport/bot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl Storage {
    pub const DEFAULT_PATH: &'static str = "/var/lib/teleport/bot";
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            kind: StorageType::Directory,
            path: Some(Self::DEFAULT_PATH.into()),
        }
    }
}

/// Splits `host:port` (or a bare host) and returns the host.
pub fn server_host(addr: &str) -> Result<&str, String> {
    if addr.contains("://") {
        return Err(format!(
            "`{addr}` has a scheme; write only `host:port`, such as `example.teleport.sh:443`"
        ));
    }
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        Some(_) => return Err(format!("`{addr}` has a port that is not a number")),
        None => addr,
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("`{addr}` is not a `host:port` address"));
    }
    Ok(host)
}

impl AgentConfig {
    /// Checks that hold within the agent config itself.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        match (&self.proxy_server, &self.auth_server) {
            (Some(_), Some(_)) => out.push(
                Problem::error("/auth_server", "both `proxy_server` and `auth_server` are set")
                    .hint("keep one: `proxy_server` is preferred"),
            ),
            (Some(addr), None) => check_server(&mut out, "/proxy_server", addr),
            (None, Some(addr)) => check_server(&mut out, "/auth_server", addr),
            (None, None) => {}
        }
        if self.credential_ttl > MAX_CREDENTIAL_TTL {
            out.push(
                Problem::error(
                    "/credential_ttl",
                    format!("`credential_ttl` is {}; the maximum is 24h", self.credential_ttl),
                )
                .hint("set `credential_ttl: 24h` or less; `1h` is the default"),
            );
        }
        if self.renewal_interval >= self.credential_ttl {
            out.push(
                Problem::error(
                    "/renewal_interval",
                    format!(
                        "`renewal_interval` ({}) must be shorter than `credential_ttl` ({}), or the identity expires before it is renewed",
                        self.renewal_interval, self.credential_ttl
                    ),
                )
                .hint("use about a third of `credential_ttl`, such as `20m` for `1h`"),
            );
        }
        if self.storage.kind == StorageType::Memory && self.storage.path.is_some() {
            out.push(
                Problem::error("/storage/path", "`path` is only for `type: directory` storage")
                    .hint("remove `path`, or set `type: directory`"),
            );
        }
        if let Some(path) = &self.storage.path
            && path.is_relative()
        {
            out.push(Problem::error(
                "/storage/path",
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
        if let Some(path) = &self.admin_socket
            && path.is_relative()
        {
            out.push(Problem::error(
                "/admin_socket",
                format!("`{}` is not an absolute path", path.display()),
            ));
        }
        for (i, pin) in self.onboarding.ca_pins.iter().enumerate() {
            if let Err(message) = check_pin(pin) {
                out.push(
                    Problem::error(format!("/onboarding/ca_pins/{i}"), message)
                        .hint("copy the pin `tbotctl status` prints on the issuer host"),
                );
            } else if pin.trim_start_matches("sha256:").bytes().all(|b| b == b'0') {
                out.push(
                    Problem::warning(
                        format!("/onboarding/ca_pins/{i}"),
                        "this is the placeholder pin of the shipped examples: no issuer presents it, so the issuer will be refused until it is replaced",
                    )
                    .hint("run `tbotctl status` on the issuer host and copy its `CA pin: sha256:…` here"),
                );
            }
        }
        if self.onboarding.insecure && self.onboarding.ca_pins.is_empty() && self.onboarding.ca_path.is_none() {
            out.push(
                Problem::warning(
                    "/onboarding/insecure",
                    "`insecure: true`: the agent trusts whatever server answers at its issuer's address on its first join, and sends it its join token",
                )
                .hint("for anything but a trial, set `onboarding.ca_pins` to the pin `tbotctl status` prints on the issuer host and remove `insecure`"),
            );
        }
        if self.onboarding.insecure && (!self.onboarding.ca_pins.is_empty() || self.onboarding.ca_path.is_some()) {
            out.push(
                Problem::error(
                    "/onboarding/insecure",
                    "`insecure: true` turns off the check that `ca_pins` and `ca_path` ask for: the issuer's identity would not be checked at all",
                )
                .hint("remove `insecure` (keep the pins), or remove `ca_pins` and `ca_path` if an unchecked issuer is really meant"),
            );
        }
        if let Some(path) = &self.onboarding.ca_path
            && path.is_relative()
        {
            out.push(
                Problem::error(
                    "/onboarding/ca_path",
                    format!("`{}` is not an absolute path", path.display()),
                )
                .hint("write the absolute path of the issuer's CA certificate (PEM)"),
            );
        }
        let mut names = BTreeSet::new();
        let mut listens = BTreeSet::new();
        let mut destinations = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("/services/{i}");
            if !names.insert(service.display_name().to_owned()) {
                out.push(
                    Problem::error(
                        format!("{at}/type"),
                        format!("two services are named `{}`", service.display_name()),
                    )
                    .hint("give each service its own `name`"),
                );
            }
            service_fields(&mut out, &at, service);
            if let Some(listen) = service.socket()
                && !listens.insert(listen.to_string())
            {
                out.push(
                    Problem::error(
                        format!("{at}/listen"),
                        format!("another service already listens on `{listen}`"),
                    )
                    .hint("give each service its own socket path"),
                );
            }
            if let Some(destination) = service.output()
                && !destinations.insert(destination.path.clone())
            {
                out.push(
                    Problem::error(
                        format!("{at}/destination/path"),
                        format!("another output already writes to `{}`", destination.path.display()),
                    )
                    .hint("give each output its own directory"),
                );
            }
            match (&service.selector.name, service.selector.labels.is_empty()) {
                (Some(_), false) => out.push(
                    Problem::error(format!("{at}/selector"), "the selector sets both `name` and `labels`")
                        .hint("set one of them"),
                ),
                (None, true) => out.push(
                    Problem::error(format!("{at}/selector"), "the selector is empty")
                        .hint("set `name: <workload_identity name>` or `labels: {key: value}`"),
                ),
                _ => {}
            }
            if let Some(ttl) = service.credential_ttl
                && ttl > MAX_CREDENTIAL_TTL
            {
                out.push(
                    Problem::error(
                        format!("{at}/credential_ttl"),
                        format!("`credential_ttl` is {ttl}; the maximum is 24h"),
                    )
                    .hint("set 24h or less, or remove it to use the agent's `credential_ttl`"),
                );
            }
        }
        out
    }

    /// The host of `proxy_server` or `auth_server`, when one is set and well formed.
    pub fn server_host(&self) -> Option<&str> {
        self.proxy_server
            .as_deref()
            .or(self.auth_server.as_deref())
            .and_then(|a| server_host(a).ok())
    }
}

fn check_server(out: &mut Vec<Problem>, pointer: &str, addr: &str) {
    if let Err(message) = server_host(addr) {
        out.push(Problem::error(pointer, message));
    }
}
