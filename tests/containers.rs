//! Container attestation against a real container engine (issue 28; `common::podman`): the first
//! step, which container a caller's `/proc/<pid>/cgroup` puts it in, for processes of real podman
//! containers as the host sees them.

mod common;

use common::podman::Podman;
use tbot::agent::containers::{Location, locate};

fn location_of(pid: &str) -> Location {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    locate(&cgroup).unwrap_or_else(|e| panic!("{e}:\n{cgroup}"))
}

#[test]
fn the_cgroup_of_a_real_containers_process_names_that_container() {
    let Some(podman) = Podman::start() else { return };
    // A plain container.
    let id = podman.sleeper("plain", &[]);
    let pid = podman.inspect(&id, "{{.State.Pid}}");
    match location_of(&pid) {
        Location::Container(c) => {
            assert_eq!(c.id, id);
            assert_eq!(c.pod_uid, None);
            assert!(!c.delegated);
        }
        other => panic!("{other:?}"),
    }
    // Its conmon (the engine's monitor process) is no container.
    let conmon = podman.inspect(&id, "{{.State.ConmonPid}}");
    assert!(matches!(location_of(&conmon), Location::NotAContainer { .. }), "conmon");
    // Nor is this test process.
    assert!(matches!(location_of("self"), Location::NotAContainer { .. }));

    // A container in a pod with an infra container: the pod's cgroup is a parent, not the container.
    podman.run(&["pod", "create", "--name", "web"]);
    let in_pod = podman.sleeper("in-pod", &["--pod", "web"]);
    match location_of(&podman.inspect(&in_pod, "{{.State.Pid}}")) {
        Location::Container(c) => assert_eq!(c.id, in_pod),
        other => panic!("{other:?}"),
    }

    // Under a kubelet-shaped cgroup parent, the pod UID comes with it.
    let uid = "3f1c2b4a-5d6e-4f70-8a9b-0c1d2e3f4a5b";
    let parent = format!("/kubepods/besteffort/pod{uid}");
    let kube = podman.sleeper("kube", &["--cgroup-parent", &parent]);
    match location_of(&podman.inspect(&kube, "{{.State.Pid}}")) {
        Location::Container(c) => {
            assert_eq!(c.id, kube);
            assert_eq!(c.pod_uid.as_deref(), Some(uid));
        }
        other => panic!("{other:?}"),
    }

    // A container *named* like another's ID changes nothing: the cgroup names the real one.
    let impostor = podman.sleeper(&id, &[]);
    assert_ne!(impostor, id);
    match location_of(&podman.inspect(&impostor, "{{.State.Pid}}")) {
        Location::Container(c) => assert_eq!(c.id, impostor),
        other => panic!("{other:?}"),
    }
}
