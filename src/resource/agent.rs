//! The agent config (`tbot.yaml`, `version: v2`): what this host's agent does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Duration, Name, Problem, string_form, vocabulary};

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

vocabulary! {
    /// What a service serves.
    ServiceType {
        /// The SPIFFE Workload API, and Envoy SDS, on a unix socket.
        WorkloadIdentityApi = "workload-identity-api",
        /// An X509-SVID written to files (`svid.pem`, `svid_key.pem`, `svid_bundle.pem`,
        /// `credential-bundle.private-key.pem`).
        WorkloadIdentityX509 = "workload-identity-x509",
        /// A JWT-SVID written to files (`jwt_svid`, `jwt_bundle.json`).
        WorkloadIdentityJwt = "workload-identity-jwt",
    }
}

impl ServiceType {
    /// Whether the service writes files (an output) rather than serving a socket.
    pub fn is_output(self) -> bool {
        !matches!(self, ServiceType::WorkloadIdentityApi)
    }
}

vocabulary! {
    /// Where an output writes.
    DestinationType {
        /// Files in a directory.
        Directory = "directory",
    }
}

vocabulary! {
    /// A signal `on_update` sends.
    SignalName {
        SIGHUP = "SIGHUP",
        SIGUSR1 = "SIGUSR1",
        SIGUSR2 = "SIGUSR2",
        SIGINT = "SIGINT",
        SIGQUIT = "SIGQUIT",
        SIGTERM = "SIGTERM",
        SIGWINCH = "SIGWINCH",
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

/// One thing the agent serves: a socket (`workload-identity-api`) or files (the outputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `workload-identity-api`, `workload-identity-x509` or `workload-identity-jwt`.
    #[serde(rename = "type")]
    pub kind: ServiceType,
    /// A name for status and logs; defaults to the type. Required when two services share a type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// `workload-identity-api` only, required: where to listen, `unix:///absolute/path.sock`, or
    /// `tcp://ip:port` (served without attestation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listen>,
    /// Which workload identities this service may issue (an output: exactly one).
    pub selector: Selector,
    /// `workload-identity-api` only: how callers are identified.
    #[serde(default, skip_serializing_if = "Attestors::is_empty")]
    pub attestors: Attestors,
    /// Lifetime of the SVIDs this service issues; defaults to the agent's `credential_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_ttl: Option<Duration>,
    /// Outputs only: renew this often instead of at half the SVID's lifetime; with `credential_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_interval: Option<Duration>,
    /// Outputs only, required: where the files go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// `workload-identity-x509` only: add federated trust domains' CAs to `svid_bundle.pem`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_federated_trust_bundles: bool,
    /// `workload-identity-jwt` only, required: the JWT-SVID's audiences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Outputs only: what to run after the files are replaced (a signal, or a command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_update: Option<OnUpdate>,
}

/// Where an output writes its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// `directory`.
    #[serde(rename = "type")]
    pub kind: DestinationType,
    /// The directory (absolute); created `0700` if missing.
    pub path: PathBuf,
    /// The files' owner (a user name or uid); defaults to tbot's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The files' group (a group name or gid); defaults to tbot's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The files' mode, in octal (default `"0600"`; `"0640"` lets `group` read them). The
    /// directory gets the same bits, with `x` wherever `r` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FileMode>,
}

/// A file mode in octal, such as `"0640"`: read and write bits only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(pub u32);

string_form!(
    FileMode,
    "tbot-file-mode",
    "A file mode in octal, quoted: `\"0600\"`, `\"0640\"`. Read and write bits only; the owner can always read."
);

impl FileMode {
    pub const DEFAULT: FileMode = FileMode(0o600);

    pub fn parse(text: &str) -> Result<FileMode, String> {
        let digits = text.strip_prefix("0o").unwrap_or(text);
        let mode = (digits.len() <= 4 && !digits.is_empty())
            .then(|| u32::from_str_radix(digits, 8).ok())
            .flatten()
            .ok_or_else(|| format!("`{text}` is not an octal file mode such as `\"0640\"`"))?;
        if mode & !0o666 != 0 {
            return Err(format!(
                "`{text}` sets bits other than read and write (setuid, sticky or execute); use read and write bits only, such as `\"0640\"`"
            ));
        }
        if mode & 0o400 == 0 {
            return Err(format!(
                "`{text}` does not let the owner read the files; start with 6, such as `\"0640\"`"
            ));
        }
        Ok(FileMode(mode))
    }

    /// The directory's mode: the same bits, with `x` wherever `r` is, and the owner's `rwx`.
    pub fn directory(self) -> u32 {
        self.0 | ((self.0 & 0o444) >> 2) | 0o700
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// What an output runs after it replaces its files. Set `signal` with `pid_file`, or `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnUpdate {
    /// A signal for the process whose pid `pid_file` holds (nginx reloads on `SIGHUP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalName>,
    /// The file holding the pid to signal, such as `/run/nginx.pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// A command to run instead, as an argument list (no shell): `["systemctl", "reload", "nginx"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    /// How long `exec` may run before it is killed and counted as failed (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl Service {
    /// The service's name: `name`, or its type.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.as_str())
    }

    /// Where a `workload-identity-api` service listens (`None` for an output).
    pub fn socket(&self) -> Option<&Listen> {
        self.listen.as_ref().filter(|_| !self.kind.is_output())
    }

    /// Where an output writes (`None` for a `workload-identity-api` service).
    pub fn output(&self) -> Option<&Destination> {
        self.destination.as_ref().filter(|_| self.kind.is_output())
    }
}

/// Selects workload identities by name, or by labels. Set exactly one.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The name of one `workload_identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// Every `workload_identity` with all of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The workload attestors a service runs on each caller.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Attestors {
    /// The unix attestor (pid, uid, gid, binary path and hash); always on for unix sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<UnixAttestor>,
    /// The systemd attestor: the caller's `.service` unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<SystemdAttestor>,
}

impl Attestors {
    pub fn is_empty(&self) -> bool {
        self == &Attestors::default()
    }
}

/// Settings of the unix attestor.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnixAttestor {
    /// Executables larger than this are not hashed (`workload.unix.binary_hash` stays unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_hash_max_size_bytes: Option<u64>,
}

/// Settings of the systemd attestor.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemdAttestor {
    /// Whether to read the caller's systemd unit.
    pub enabled: bool,
}

/// A listen address: a unix socket path or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

string_form!(
    Listen,
    "tbot-listen",
    "`unix:///absolute/path.sock`, or `tcp://ip:port` (served without attestation)."
);

impl Listen {
    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{text}` is not an absolute socket path; write three slashes: `unix:///{}`",
                    path.trim_start_matches('/')
                ));
            }
            if path.len() > 107 {
                return Err(format!(
                    "the socket path `{path}` is {} bytes; unix sockets allow 107",
                    path.len()
                ));
            }
            return Ok(Listen::Unix(path.into()));
        }
        if let Some(addr) = text.strip_prefix("tcp://") {
            return addr
                .parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("`{addr}` is not an `ip:port` address, such as `127.0.0.1:8443`"));
        }
        if text.starts_with('/') {
            return Err(format!("`{text}` has no scheme; write `unix://{text}`"));
        }
        Err(format!(
            "`{text}` is not a listen address; write `unix:///path/to/socket` or `tcp://ip:port`"
        ))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix://{}", path.display()),
            Listen::Tcp(addr) => write!(f, "tcp://{addr}"),
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
            }
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

/// The fields each service type requires, and the ones it does not take.
fn service_fields(out: &mut Vec<Problem>, at: &str, service: &Service) {
    let kind = service.kind;
    let not_for = |field: &str, types: &str| {
        Problem::error(
            format!("{at}/{field}"),
            format!("`{field}` is not a field of a `{kind}` service"),
        )
        .hint(format!("remove it: `{field}` is only for {types}"))
    };
    let required = |field: &str, example: &str| {
        Problem::error(format!("{at}/type"), format!("a `{kind}` service needs `{field}`"))
            .hint(format!("add `{field}: {example}`"))
    };
    let outputs = "`workload-identity-x509` and `workload-identity-jwt`";
    if kind.is_output() {
        if service.listen.is_some() {
            out.push(not_for("listen", "`workload-identity-api`; an output writes files"));
        }
        if !service.attestors.is_empty() {
            out.push(not_for(
                "attestors",
                "`workload-identity-api`; an output acts as the bot itself",
            ));
        }
        match &service.destination {
            None => out.push(required(
                "destination",
                "{type: directory, path: /var/lib/tbot/out/NAME}",
            )),
            Some(d) if d.path.is_relative() => out.push(
                Problem::error(
                    format!("{at}/destination/path"),
                    format!("`{}` is not an absolute path", d.path.display()),
                )
                .hint("write the directory's absolute path"),
            ),
            Some(_) => {}
        }
        if service.renewal_interval.is_some() != service.credential_ttl.is_some() {
            out.push(
                Problem::error(
                    format!("{at}/renewal_interval"),
                    "set `credential_ttl` and `renewal_interval` together, or neither",
                )
                .hint("without them the agent's `credential_ttl` applies and the files are renewed at half of it"),
            );
        }
        if let (Some(interval), Some(ttl)) = (service.renewal_interval, service.credential_ttl)
            && interval >= ttl
        {
            out.push(
                Problem::error(
                    format!("{at}/renewal_interval"),
                    format!("`renewal_interval` ({interval}) must be shorter than `credential_ttl` ({ttl})"),
                )
                .hint("use about a third of `credential_ttl`, such as `20m` for `1h`"),
            );
        }
        if let Some(hook) = &service.on_update {
            match (&hook.signal, &hook.pid_file, hook.exec.is_empty()) {
                (Some(_), Some(_), true) | (None, None, false) => {}
                (Some(_), None, _) => out.push(
                    Problem::error(format!("{at}/on_update"), "`signal` needs `pid_file`")
                        .hint("add `pid_file: /run/NAME.pid`, the file holding the pid to signal"),
                ),
                (None, Some(_), _) => out.push(
                    Problem::error(format!("{at}/on_update"), "`pid_file` needs `signal`").hint("add `signal: SIGHUP`"),
                ),
                (Some(_), Some(_), false) => out.push(
                    Problem::error(format!("{at}/on_update"), "set `signal` or `exec`, not both").hint("keep one"),
                ),
                (None, None, true) => out.push(
                    Problem::error(format!("{at}/on_update"), "`on_update` is empty")
                        .hint("set `signal` with `pid_file`, or `exec: [command, args...]`"),
                ),
            }
            if let Some(pid_file) = &hook.pid_file
                && pid_file.is_relative()
            {
                out.push(Problem::error(
                    format!("{at}/on_update/pid_file"),
                    format!("`{}` is not an absolute path", pid_file.display()),
                ));
            }
        }
    } else {
        if service.listen.is_none() {
            out.push(required("listen", "unix:///run/tbot/workload.sock"));
        }
        for (field, set) in [
            ("destination", service.destination.is_some()),
            ("renewal_interval", service.renewal_interval.is_some()),
            ("on_update", service.on_update.is_some()),
            ("audiences", !service.audiences.is_empty()),
            (
                "include_federated_trust_bundles",
                service.include_federated_trust_bundles,
            ),
        ] {
            if set {
                out.push(not_for(field, outputs));
            }
        }
    }
    match kind {
        ServiceType::WorkloadIdentityJwt => {
            if service.audiences.is_empty() || service.audiences.iter().any(String::is_empty) {
                out.push(
                    Problem::error(
                        format!("{at}/audiences"),
                        "a `workload-identity-jwt` output needs at least one audience, none empty",
                    )
                    .hint("add `audiences: [api.example.com]`, the services the token is for"),
                );
            }
            if service.include_federated_trust_bundles {
                out.push(not_for("include_federated_trust_bundles", "`workload-identity-x509`"));
            }
        }
        ServiceType::WorkloadIdentityX509 if !service.audiences.is_empty() => {
            out.push(not_for("audiences", "`workload-identity-jwt`"));
        }
        _ => {}
    }
}

fn check_server(out: &mut Vec<Problem>, pointer: &str, addr: &str) {
    if let Err(message) = server_host(addr) {
        out.push(Problem::error(pointer, message));
    }
}
