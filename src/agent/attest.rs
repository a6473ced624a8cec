//! Workload attestation from a socket's peer credentials: `unix` (pid, uid, gid, the executable's
//! path and SHA-256) and `systemd` (the caller's `.service` unit from `/proc/<pid>/cgroup`, cgroup v1
//! `name=systemd` or the v2 unified path). A pid reused between connect and attestation is detected
//! by comparing the process start time before and after, and refused rather than misattributed.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::agent::containers::Findings;
use crate::issuer::Attributes;

/// Executables larger than this are not hashed unless the service says otherwise.
pub const DEFAULT_HASH_LIMIT: u64 = 256 * 1024 * 1024;

/// What the peer credentials say about a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// How a service attests its callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestSettings {
    pub hash_limit: u64,
    pub systemd: bool,
    /// Where `/proc` is (tests point it elsewhere).
    pub proc_root: PathBuf,
    /// The container engines asked about a caller's container (`docker`, `podman` attestors).
    pub engines: Vec<crate::agent::containers::engine::EngineSettings>,
    /// The kubelet asked about a caller's pod (`kubernetes` attestor).
    pub kubelet: Option<crate::agent::containers::kubernetes::KubeletSettings>,
}

impl Default for AttestSettings {
    fn default() -> Self {
        AttestSettings {
            hash_limit: DEFAULT_HASH_LIMIT,
            systemd: false,
            proc_root: PathBuf::from("/proc"),
            engines: Vec::new(),
            kubelet: None,
        }
    }
}

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The process went away, or its pid now names another process: the caller must reconnect.
    #[error("the calling process (pid {pid}) exited or its pid was reused during attestation; reconnect")]
    PidReused { pid: i32 },
    /// `/proc` could not be read for the caller.
    #[error("cannot read /proc for pid {pid}: {reason}")]
    Proc { pid: i32, reason: String },
}

/// The process start time (clock ticks since boot), field 22 of `/proc/<pid>/stat`.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The service unit of a process, from the contents of `/proc/<pid>/cgroup`: the last `.service`
/// segment of the v1 `name=systemd` path, else of the v2 unified (`0::`) path, without the suffix.
pub fn systemd_service(cgroup: &str) -> Option<String> {
    let path_of = |wanted: &dyn Fn(&str, &str) -> bool| {
        cgroup.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            wanted(id, controllers).then(|| path.to_owned())
        })
    };
    let v1 = path_of(&|_, controllers| controllers.split(',').any(|c| c == "name=systemd"));
    let v2 = path_of(&|id, controllers| id == "0" && controllers.is_empty());
    [v1, v2].into_iter().flatten().find_map(|path| {
        path.rsplit('/')
            .find_map(|segment| segment.strip_suffix(".service"))
            .filter(|name| !name.is_empty())
            .map(|name| name.to_owned())
    })
}

/// Hashes already computed, by (device, inode, size, modification time) of the executable, so a
/// busy caller's binary is read once, not at every connection.
type FileIdentity = (u64, u64, u64, i64, i64);

fn hash_cache() -> &'static Mutex<HashMap<FileIdentity, String>> {
    static CACHE: OnceLock<Mutex<HashMap<FileIdentity, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn hash_file(path: &Path, limit: u64) -> Option<String> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if meta.len() > limit {
        return None;
    }
    let key = (meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec());
    if let Some(hash) = hash_cache().lock().expect("hash cache poisoned").get(&key) {
        return Some(hash.clone());
    }
    let hash = hash_contents(file, limit)?;
    let mut cache = hash_cache().lock().expect("hash cache poisoned");
    if cache.len() >= 1024 {
        cache.clear();
    }
    cache.insert(key, hash.clone());
    Some(hash)
}

fn hash_contents(file: File, limit: u64) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut reader = file.take(limit + 1);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(crate::hex(&hasher.finalize()))
}

/// Attests a caller (blocking: reads `/proc` and hashes the executable).
pub fn attest(peer: Peer, settings: &AttestSettings) -> Result<Attributes, AttestError> {
    let pid = peer.pid;
    let proc_dir = settings.proc_root.join(pid.to_string());
    let before = start_time(&settings.proc_root, pid).ok_or(AttestError::PidReused { pid })?;
    let mut attrs = Attributes::new();
    attrs
        .set("workload.unix.attested", true)
        .set("workload.unix.pid", pid)
        .set("workload.unix.uid", peer.uid)
        .set("workload.unix.gid", peer.gid);
    let exe = proc_dir.join("exe");
    if let Ok(path) = std::fs::read_link(&exe) {
        attrs.set("workload.unix.binary_path", path.display());
    }
    if let Some(hash) = hash_file(&exe, settings.hash_limit) {
        attrs.set("workload.unix.binary_hash", hash);
    }
    if settings.systemd {
        let cgroup = std::fs::read_to_string(proc_dir.join("cgroup")).map_err(|e| AttestError::Proc {
            pid,
            reason: e.to_string(),
        })?;
        match systemd_service(&cgroup) {
            Some(service) => {
                attrs
                    .set("workload.systemd.attested", true)
                    .set("workload.systemd.service", service);
            }
            None => {
                attrs.set("workload.systemd.attested", false);
            }
        }
    }
    if start_time(&settings.proc_root, pid) != Some(before) {
        return Err(AttestError::PidReused { pid });
    }
    Ok(only_valid(attrs, pid))
}

/// The container attestors (`docker`, `podman`, `kubernetes`): the engines (or the kubelet) are asked about the caller's
/// container, then the pid is checked again, as the engine call took time in which it could have
/// been reused. Nothing to do without engines.
pub async fn attest_containers(peer: Peer, settings: &AttestSettings) -> Result<Findings, AttestError> {
    if settings.engines.is_empty() && settings.kubelet.is_none() {
        return Ok(Findings::default());
    }
    let pid = peer.pid;
    let before = start_time(&settings.proc_root, pid).ok_or(AttestError::PidReused { pid })?;
    let cgroup = std::fs::read_to_string(settings.proc_root.join(pid.to_string()).join("cgroup")).map_err(|e| {
        AttestError::Proc {
            pid,
            reason: e.to_string(),
        }
    })?;
    let mut found = crate::agent::containers::engine::attest(&cgroup, &settings.engines, &settings.proc_root).await;
    if let Some(kubelet) = &settings.kubelet {
        found.extend(crate::agent::containers::kubernetes::attest(&cgroup, kubelet).await);
    }
    if start_time(&settings.proc_root, pid) != Some(before) {
        return Err(AttestError::PidReused { pid });
    }
    found.attributes = only_valid(found.attributes, pid);
    Ok(found)
}

/// The attributes whose values the issuer takes (`resource::template::workload_value_problem`): one
/// that is not (an executable path with a newline in it) is left unset, as if not attested, so an
/// identity that reads it is denied naming it, and the others are decided as usual.
fn only_valid(attrs: Attributes, pid: i32) -> Attributes {
    let mut out = Attributes::new();
    for (name, values) in attrs.iter() {
        match crate::resource::template::workload_value_problem(name, values) {
            None => {
                out.set_many(name, values.to_vec());
            }
            Some(why) => {
                tracing::debug!(
                    pid,
                    attribute = name,
                    why,
                    "an attested value the issuer would refuse is left unset"
                );
            }
        }
    }
    out
}

impl crate::error::Explain for AttestError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            AttestError::PidReused { .. } => "".into(),
            AttestError::Proc { .. } => "tbot reads /proc as root (or with CAP_SYS_PTRACE); check how it runs".into(),
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, AttestError::PidReused { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_comes_from_the_v1_systemd_hierarchy_first() {
        let cgroup = "9:name=systemd:/system.slice/my-app.service\n4:memory:/x\n0::/system.slice/other.service\n";
        assert_eq!(systemd_service(cgroup).as_deref(), Some("my-app"));
    }

    #[test]
    fn the_service_comes_from_the_v2_unified_path_without_v1() {
        let cgroup = "0::/system.slice/nginx.service\n";
        assert_eq!(systemd_service(cgroup).as_deref(), Some("nginx"));
        let nested = "0::/system.slice/web.service/worker\n";
        assert_eq!(systemd_service(nested).as_deref(), Some("web"));
    }

    #[test]
    fn scopes_slices_and_the_root_are_not_services() {
        assert_eq!(
            systemd_service("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(systemd_service("9:name=systemd:/\n0::/\n"), None);
    }

    #[test]
    fn this_process_attests_with_its_own_uid_and_executable() {
        let peer = Peer {
            pid: std::process::id() as i32,
            uid: 4242,
            gid: 4243,
        };
        // The debug test binary itself can outgrow the default limit; the limit has its own test.
        let settings = AttestSettings {
            hash_limit: 1 << 40,
            ..AttestSettings::default()
        };
        let attrs = attest(peer, &settings).unwrap();
        let get = |name: &str| {
            let a = crate::resource::template::Attribute::parse(name).unwrap();
            attrs.get(&a).map(|v| v[0].clone())
        };
        assert_eq!(get("workload.unix.uid").as_deref(), Some("4242"));
        assert_eq!(
            get("workload.unix.binary_path"),
            Some(std::env::current_exe().unwrap().display().to_string())
        );
        assert_eq!(get("workload.unix.binary_hash").map(|h| h.len()), Some(64));
    }

    #[test]
    fn a_value_the_issuer_would_refuse_is_left_unset() {
        let mut attrs = Attributes::new();
        attrs
            .set("workload.unix.uid", 1000)
            .set("workload.unix.binary_path", "/tmp/a\nb");
        let kept = only_valid(attrs, 1);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["workload.unix.uid"]);
    }

    #[test]
    fn a_pid_that_is_gone_is_refused_as_reused() {
        let peer = Peer {
            pid: i32::MAX - 1,
            uid: 0,
            gid: 0,
        };
        assert_eq!(
            attest(peer, &AttestSettings::default()),
            Err(AttestError::PidReused { pid: i32::MAX - 1 })
        );
    }
}
