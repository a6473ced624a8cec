//! Which container a caller runs in, from `/proc/<pid>/cgroup` alone: the first step of the
//! `docker`, `podman` and `kubernetes` attestors (issue 28). Never from `/proc/<pid>/mountinfo`,
//! which the workload controls (it can bind-mount another container's cgroup directory there).
//!
//! Each cgroup path is walked from the leaf up, and only known container segment shapes count:
//! `<64 hex>`, `docker-<64 hex>.scope`, `libpod-<64 hex>.scope`, `cri-containerd-<64 hex>.scope`,
//! `crio-<64 hex>.scope`, and systemd's `…:cri-containerd:<64 hex>` form. The first match from the
//! leaf is the caller's container, so a workload of a kind node (`/docker/<node>/kubepods/…/<id>`)
//! is told from its node; segments below it (`container`, a cgroup the container made) belong to
//! it. A `conmon` cgroup never matches. Above the container, a `pod<uid>` segment names its
//! Kubernetes pod, and a `user@<uid>.service` segment marks a subtree whose names that user chose
//! (rootless engines). The engine is asked afterwards whether the ID is real and the caller's.

pub mod engine;
pub mod kubernetes;

/// Where a caller's cgroup puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// No cgroup path names a container (a host process, a systemd service).
    NotAContainer {
        path: String,
    },
    /// Every path is `/`: tbot runs in a private cgroup namespace and sees nothing of the caller.
    HiddenByCgroupNamespace,
    Container(Container),
}

/// A container found in a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The container's 64-hex ID, as the engine knows it.
    pub id: String,
    /// The Kubernetes pod UID of a `pod<uid>` segment above it, with `-` separators.
    pub pod_uid: Option<String>,
    /// Whether the path runs through a user's delegated subtree (`user@<uid>.service`), whose cgroup
    /// names that user chose.
    pub delegated: bool,
    /// The cgroup path it was found in.
    pub path: String,
}

/// The cgroup lines name different containers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the caller's cgroup lines name different containers: {first} and {second}")]
pub struct Disagreement {
    pub first: String,
    pub second: String,
}

/// What the container attestors found about a caller: the attributes they set, and for each
/// attestor that could not be asked (an engine socket refused, a kubelet's 403, a pod not listed in
/// time, a cgroup namespace that hides the caller) why, for the denial message. Such an attestor
/// sets nothing, so an identity that reads its attributes is denied rather than decided without it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub attributes: crate::issuer::Attributes,
    pub unasked: Vec<String>,
}

impl Findings {
    /// Records that `attestor` could not be asked, and why.
    pub(crate) fn unasked(&mut self, attestor: &str, why: impl std::fmt::Display) {
        self.unasked.push(format!("{attestor}: not asked ({why})"));
    }

    pub(crate) fn extend(&mut self, other: Findings) {
        self.attributes.extend(&other.attributes);
        self.unasked.extend(other.unasked);
    }
}

/// Why a container attestor sets nothing when tbot sees `/` for its callers.
pub(crate) const HIDDEN: &str = "tbot runs in a private cgroup namespace and cannot see the caller's container";

/// Logs, at most once a minute, that tbot cannot see its callers' cgroups: it runs in a private
/// cgroup namespace, so no container attestor can tell containers apart.
pub(crate) fn warn_hidden() {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().expect("warning clock poisoned");
    if last.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
        return;
    }
    *last = Some(Instant::now());
    tracing::warn!(
        "tbot sees the cgroup `/` for its callers: it runs in a private cgroup namespace, so the container attestors \
         set nothing; run tbot in the host's cgroup namespace (`--cgroupns=host`, or a DaemonSet's `hostPID` with \
         the host's cgroup mount)"
    );
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The container ID a single path segment names, if it has a known container shape.
fn container_of(segment: &str) -> Option<&str> {
    // systemd's cgroup driver for containerd and cri-o: `<slice>:cri-containerd:<id>`.
    if let Some((_, rest)) = segment.split_once(':') {
        let (runtime, id) = rest.split_once(':')?;
        return (matches!(runtime, "cri-containerd" | "crio" | "docker") && is_hex(id, 64)).then_some(id);
    }
    let bare = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["docker-", "libpod-", "cri-containerd-", "crio-"]
        .iter()
        .find_map(|prefix| bare.strip_prefix(prefix))
        .unwrap_or(bare);
    is_hex(id, 64).then_some(id)
}

/// The pod UID a segment names: `pod<uid>`, `pod<uid>.slice`, `kubepods-besteffort-pod<uid>.slice`
/// (with `_` for `-` in systemd's form).
fn pod_of(segment: &str) -> Option<String> {
    let bare = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = bare.rfind("pod")?;
    if start > 0 && !bare[..start].ends_with('-') {
        return None;
    }
    let uid = bare[start + 3..].replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    (groups.len() == 5 && groups.iter().zip(shape).all(|(g, n)| is_hex(g, n))).then_some(uid)
}

fn is_delegated(segment: &str) -> bool {
    segment
        .strip_prefix("user@")
        .and_then(|s| s.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// The container one cgroup path names, if any.
fn in_path(path: &str) -> Option<Container> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segments.iter().rposition(|s| container_of(s).is_some())?;
    let above = &segments[..at];
    Some(Container {
        id: container_of(segments[at])?.to_owned(),
        pod_uid: above.iter().rev().find_map(|s| pod_of(s)),
        delegated: above.iter().any(|s| is_delegated(s)),
        path: path.to_owned(),
    })
}

/// Where the contents of `/proc/<pid>/cgroup` put the caller. Lines that name a pod win over lines
/// that do not (some hierarchies hold less); lines that still name different containers are refused.
pub fn locate(cgroup: &str) -> Result<Location, Disagreement> {
    let paths: Vec<&str> = cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .filter(|p| !p.is_empty())
        .collect();
    let found: Vec<Container> = paths.iter().filter_map(|p| in_path(p)).collect();
    let with_pod: Vec<&Container> = found.iter().filter(|c| c.pod_uid.is_some()).collect();
    let chosen: Vec<&Container> = if with_pod.is_empty() {
        found.iter().collect()
    } else {
        with_pod
    };
    let Some(first) = chosen.first() else {
        if !paths.is_empty() && paths.iter().all(|p| *p == "/") {
            return Ok(Location::HiddenByCgroupNamespace);
        }
        let path = paths.iter().copied().find(|p| *p != "/").unwrap_or("/");
        return Ok(Location::NotAContainer { path: path.to_owned() });
    };
    if let Some(other) = chosen.iter().find(|c| c.id != first.id) {
        return Err(Disagreement {
            first: first.id.clone(),
            second: other.id.clone(),
        });
    }
    Ok(Location::Container((*first).clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "52dbf98dd8948d8a35df81cca6206ed146cbf3cefb83a69c3efc5872e398dbfd";
    const B: &str = "8e44c6b6a2f1f0c4d9e7b3a1c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f5a7b91657";
    const POD: &str = "3f1c2b4a-5d6e-4f70-8a9b-0c1d2e3f4a5b";

    /// Ten identical lines, as podman 4.3.1 with cgroupfs on a hybrid host writes them (research
    /// note, §4).
    fn all_hierarchies(path: &str) -> String {
        let controllers = [
            "9:name=systemd",
            "8:pids",
            "7:memory",
            "6:devices",
            "5:cpu,cpuacct",
            "4:blkio",
            "3:freezer",
            "2:net_cls,net_prio",
            "1:cpuset",
        ];
        let mut out: Vec<String> = controllers.iter().map(|c| format!("{c}:{path}")).collect();
        out.push(format!("0::{path}"));
        out.join("\n")
    }

    fn container(cgroup: &str) -> Container {
        match locate(cgroup) {
            Ok(Location::Container(c)) => c,
            other => panic!("no container in {cgroup:?}: {other:?}"),
        }
    }

    #[test]
    fn podman_containers_seen_on_a_real_host() {
        // A plain container, and a process `podman exec`'d into it.
        let c = container(&all_hierarchies(&format!("/libpod_parent/libpod-{A}")));
        assert_eq!((c.id.as_str(), c.pod_uid, c.delegated), (A, None, false));
        // In a pod with an infra container: the pod's ID is a parent segment, not the container.
        let c = container(&all_hierarchies(&format!("/libpod_parent/{B}/libpod-{A}")));
        assert_eq!(c.id, A);
        // Under a kubelet-shaped parent.
        let c = container(&all_hierarchies(&format!("/kubepods/besteffort/pod{POD}/libpod-{A}")));
        assert_eq!((c.id.as_str(), c.pod_uid.as_deref()), (A, Some(POD)));
        // Read from a private cgroup namespace: the prefix is gone, the ID is not.
        assert_eq!(container(&format!("0::/../libpod-{A}")).id, A);
    }

    #[test]
    fn conmon_host_processes_and_a_hidden_view_are_not_containers() {
        let conmon = "9:name=systemd:/\n8:pids:/libpod_parent/conmon\n0::/";
        assert!(matches!(locate(conmon), Ok(Location::NotAContainer { .. })));
        for path in [
            format!("/system.slice/libpod-conmon-{A}.scope"),
            format!("/kubepods/crio-conmon-{A}.scope"),
        ] {
            assert!(
                matches!(locate(&format!("0::{path}")), Ok(Location::NotAContainer { .. })),
                "{path}"
            );
        }
        assert_eq!(
            locate("0::/system.slice/nginx.service"),
            Ok(Location::NotAContainer {
                path: "/system.slice/nginx.service".into()
            })
        );
        assert_eq!(locate("0::/\n1:name=systemd:/"), Ok(Location::HiddenByCgroupNamespace));
        // A segment that is 64 hex characters with something else around it is no container.
        for path in [
            format!("/x{A}"),
            format!("/{A}x"),
            format!("/docker-{}", &A[..63]),
            format!("/DOCKER-{A}.scope"),
        ] {
            assert!(
                matches!(locate(&format!("0::{path}")), Ok(Location::NotAContainer { .. })),
                "{path}"
            );
        }
    }

    #[test]
    fn documented_shapes_of_docker_containerd_crio_and_kind() {
        // Docker with cgroupfs and with systemd; a private cgroup namespace (docker-in-docker).
        assert_eq!(container(&format!("0::/docker/{A}")).id, A);
        assert_eq!(container(&format!("0::/system.slice/docker-{A}.scope")).id, A);
        assert_eq!(container(&format!("0::/../{A}")).id, A);
        // containerd and cri-o under the kubelet, cgroupfs and systemd drivers.
        let c = container(&format!("0::/kubepods/burstable/pod{POD}/{A}"));
        assert_eq!(c.pod_uid.as_deref(), Some(POD));
        let systemd_uid = POD.replace('-', "_");
        let c = container(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/cri-containerd-{A}.scope"
        ));
        assert_eq!((c.id.as_str(), c.pod_uid.as_deref()), (A, Some(POD)));
        let c = container(&format!(
            "0::/kubepods.slice/kubepods-pod{systemd_uid}.slice:cri-containerd:{A}"
        ));
        assert_eq!(c.id, A);
        assert_eq!(container(&format!("0::/kubepods.slice/crio-{A}.scope")).id, A);
        // kind: the node is a docker container; the workload's ID is the last one.
        let c = container(&format!("0::/docker/{B}/kubepods/besteffort/pod{POD}/{A}"));
        assert_eq!((c.id.as_str(), c.pod_uid.as_deref()), (A, Some(POD)));
        // A cgroup the container made for itself below its own.
        assert_eq!(container(&format!("0::/docker/{A}/worker")).id, A);
    }

    #[test]
    fn rootless_subtrees_are_marked_delegated() {
        let c = container(&format!(
            "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{A}.scope/container"
        ));
        assert_eq!((c.id.as_str(), c.delegated), (A, true));
        // A user's service named like `user@` is not a delegation marker.
        assert!(!container(&format!("0::/system.slice/user@x.service/docker-{A}.scope")).delegated);
    }

    #[test]
    fn lines_that_name_a_pod_win_and_disagreements_are_refused() {
        let mixed = format!("1:name=systemd:/docker/{B}\n0::/kubepods/besteffort/pod{POD}/{A}");
        assert_eq!(container(&mixed).id, A);
        let split = format!("1:name=systemd:/docker/{B}\n0::/docker/{A}");
        let refused = locate(&split).unwrap_err();
        assert!(refused.to_string().contains("different containers"), "{refused}");
    }
}
