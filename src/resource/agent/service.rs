//! The agent config's services: what each serves (a Workload API socket, or files), where, for
//! whom (`selector`, `attestors`), and how each is checked.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::{Duration, Name, Problem, string_form, vocabulary};

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
    /// The docker attestor: the caller's container, asked of the Docker Engine API
    /// (`workload.docker.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<EngineAttestor>,
    /// The podman attestor: the caller's container and pod, asked of Podman's libpod API
    /// (`workload.podman.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub podman: Option<EngineAttestor>,
    /// The kubernetes attestor: the caller's pod and container, asked of the node's kubelet
    /// (`workload.kubernetes.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesAttestor>,
}

/// Settings of the `kubernetes` attestor (Teleport's keys, and `node_name`, `pod_wait`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesAttestor {
    pub enabled: bool,
    #[serde(default)]
    pub kubelet: Kubelet,
    /// The node whose kubelet is asked. Default: the `TELEPORT_NODE_NAME` environment variable (set
    /// it from the downward API's `spec.nodeName`), else `127.0.0.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// How long to wait for a just-started pod or container to be listed by the kubelet
    /// (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_wait: Option<Duration>,
}

/// How the kubelet is reached.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kubelet {
    /// The HTTPS port (default `10250`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_port: Option<u16>,
    /// The plain-HTTP read-only port, instead of `secure_port` (most clusters turn it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_port: Option<u16>,
    /// The service account token sent to the kubelet (default
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_path: Option<PathBuf>,
    /// The CA that signs the kubelet's certificate (default
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_path: Option<PathBuf>,
    /// Do not check the kubelet's certificate (self-signed kubelets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_verify: bool,
    /// Send no token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
}

impl KubernetesAttestor {
    /// The URL of the kubelet's pod list, from the settings and `TELEPORT_NODE_NAME`.
    pub fn pods_url(&self) -> String {
        let node = self
            .node_name
            .clone()
            .or_else(|| std::env::var("TELEPORT_NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "127.0.0.1".into());
        let host = if node.contains(':') { format!("[{node}]") } else { node };
        match self.kubelet.read_only_port {
            Some(port) => format!("http://{host}:{port}/pods"),
            None => format!("https://{host}:{}/pods", self.kubelet.secure_port.unwrap_or(10250)),
        }
    }
}

/// The two container engines tbot asks about a caller's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// Settings of the `docker` and `podman` attestors (Teleport's keys, and `allow_rootless`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineAttestor {
    pub enabled: bool,
    /// The engine's API socket, `unix:///absolute/path`. Docker: `unix:///var/run/docker.sock` by
    /// default. Podman has no default: `unix:///run/podman/podman.sock` for the root engine
    /// (`systemctl enable --now podman.socket`), `unix:///run/user/<uid>/podman/podman.sock` for a user's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Whether containers in a user's delegated cgroup subtree (`user@<uid>.service`: rootless
    /// engines) are attested. Default `false`: that user chose those cgroup names, and serves the
    /// engine socket it would be asked on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_rootless: bool,
}

impl EngineAttestor {
    /// The engine's socket path, or why `addr` is not one (or missing).
    pub fn socket(&self, engine: Engine) -> Result<PathBuf, String> {
        let addr = match (&self.addr, engine) {
            (Some(addr), _) => addr.as_str(),
            (None, Engine::Docker) => "unix:///var/run/docker.sock",
            (None, Engine::Podman) => {
                return Err("the podman attestor has no default socket: set `addr`".into());
            }
        };
        match Listen::parse(addr) {
            Ok(Listen::Unix(path)) => Ok(path),
            Ok(Listen::Tcp(_)) => Err(format!(
                "`{addr}` is a TCP address; the engine's API is asked on its unix socket"
            )),
            Err(why) => Err(why),
        }
    }
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

/// The fields each service type requires, and the ones it does not take.
pub(super) fn service_fields(out: &mut Vec<Problem>, at: &str, service: &Service) {
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
    for (engine, settings) in [
        (Engine::Docker, &service.attestors.docker),
        (Engine::Podman, &service.attestors.podman),
    ] {
        let Some(settings) = settings.as_ref().filter(|s| s.enabled) else {
            continue;
        };
        if let Err(why) = settings.socket(engine) {
            let hint = match engine {
                Engine::Docker => "write the engine's socket, such as `addr: unix:///var/run/docker.sock`",
                Engine::Podman => {
                    "the root engine: `addr: unix:///run/podman/podman.sock` (`systemctl enable --now podman.socket`); \
                     a user's: `addr: unix:///run/user/<uid>/podman/podman.sock`"
                }
            };
            let field = if settings.addr.is_some() { "addr" } else { "enabled" };
            out.push(Problem::error(format!("{at}/attestors/{}/{field}", engine.name()), why).hint(hint));
        }
    }
    if let Some(k) = service.attestors.kubernetes.as_ref().filter(|k| k.enabled) {
        let at = format!("{at}/attestors/kubernetes/kubelet");
        if k.kubelet.secure_port.is_some() && k.kubelet.read_only_port.is_some() {
            out.push(
                Problem::error(
                    format!("{at}/read_only_port"),
                    "`secure_port` and `read_only_port` are both set",
                )
                .hint("keep one: `secure_port` (HTTPS, the default 10250) or `read_only_port` (plain HTTP)"),
            );
        }
        if k.kubelet.read_only_port.is_some() && k.kubelet.token_path.is_some() {
            out.push(
                Problem::error(
                    format!("{at}/token_path"),
                    "a token is never sent to the read-only port: it is plain HTTP, and the token would cross the network in the clear",
                )
                .hint("remove `token_path`, or ask the kubelet on `secure_port` (HTTPS) with the token"),
            );
        }
        for (field, path) in [("token_path", &k.kubelet.token_path), ("ca_path", &k.kubelet.ca_path)] {
            if let Some(path) = path.as_ref().filter(|p| p.is_relative()) {
                out.push(
                    Problem::error(
                        format!("{at}/{field}"),
                        format!("`{}` is not an absolute path", path.display()),
                    )
                    .hint("write the file's absolute path"),
                );
            }
        }
    }
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
