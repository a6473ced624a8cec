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

/// A copy of the quickstart whose service asks `engine_socket` with both container attestors, and
/// whose identities include `/podman/<container name>` (for containers labelled `team=blue`) and
/// `/docker/<container name>`.
fn daemon_with_engines(engine_socket: &std::path::Path) -> common::Daemon {
    let addr = format!("unix://{}", engine_socket.display());
    let attestors = format!(
        "      unix: {{}}\n      podman: {{enabled: true, addr: \"{addr}\"}}\n      docker: {{enabled: true, addr: \"{addr}\"}}"
    );
    daemon_with("{app: quickstart}", &attestors, "")
}

/// A copy of the quickstart whose service has `attestors` (YAML lines under `attestors:`) and
/// selects the identities labelled `selector` (the quickstart's own and the podman and docker ones
/// are labelled `app: quickstart`), with the identities `more` added.
fn daemon_with(selector: &str, attestors: &str, more: &str) -> common::Daemon {
    let identities = "team: \"{{ strings.lower(user.bot_name) }}\"\n---\nkind: workload_identity\nversion: v1\nmetadata:\n  \
                      name: by-podman\n  labels: {app: quickstart}\nspec:\n  rules:\n    allow:\n      - conditions:\n          \
                      - attribute: workload.podman.container.labels.team\n            eq: {value: blue}\n  spiffe:\n    \
                      id: \"/podman/{{workload.podman.container.name}}\"\n---\nkind: workload_identity\nversion: v1\n\
                      metadata:\n  name: by-docker\n  labels: {app: quickstart}\nspec:\n  spiffe:\n    \
                      id: \"/docker/{{workload.docker.container.name}}\"\n";
    let identities = format!("{identities}{more}");
    let mut edits: Vec<(&str, &str, &str)> = common::QUICKSTART_IN_MEMORY.to_vec();
    let selector = format!("selector:\n      labels: {selector}");
    edits.push(("tbot.yaml", "selector:\n      name: quickstart", &selector));
    edits.push(("tbot.yaml", "      unix: {}", attestors));
    edits.push((
        "workload-identity.yaml",
        "team: \"{{ strings.lower(user.bot_name) }}\"\n",
        &identities,
    ));
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &edits);
    common::Daemon::start(dir, socket)
}

/// The mounts that let the host's `tbot` run in the busybox image and reach the daemon's socket
/// (at `/run/tbot-test`).
fn mounts(daemon: &common::Daemon) -> Vec<String> {
    let socket_dir = daemon.endpoint().trim_start_matches("unix:").to_owned();
    let socket_dir = std::path::Path::new(&socket_dir).parent().unwrap().to_owned();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tbot"))
        .parent()
        .unwrap()
        .to_owned();
    let mut out = Vec::new();
    for m in [
        "/usr:/usr:ro".to_owned(),
        "/lib:/lib:ro".to_owned(),
        "/lib64:/lib64:ro".to_owned(),
        format!("{}:/tbot:ro", bin.display()),
        format!("{}:/run/tbot-test", socket_dir.display()),
    ] {
        out.extend(["-v".to_owned(), m]);
    }
    out
}

/// The `spiffe-inspect` command line for the daemon's socket, as seen inside a container.
fn inspect_command(daemon: &common::Daemon) -> Vec<String> {
    let socket = format!(
        "unix:///run/tbot-test/{}",
        daemon.endpoint().rsplit('/').next().unwrap()
    );
    ["/tbot/tbot", "spiffe-inspect", "--path", &socket]
        .map(str::to_owned)
        .to_vec()
}

fn text(out: std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tbot spiffe-inspect` run in a new container on the daemon's socket: the host's binary and
/// libraries mounted read-only into the busybox image.
fn inspect_from_container(podman: &Podman, daemon: &common::Daemon, name: &str, extra: &[&str]) -> String {
    let mut args: Vec<String> = ["run", "--rm", "--network", "none", "--name", name]
        .map(str::to_owned)
        .to_vec();
    args.extend(mounts(daemon));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(common::podman::IMAGE.to_owned());
    args.extend(inspect_command(daemon));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    text(podman.command(&args).output().unwrap())
}

/// `tbot spiffe-inspect` run by this test process, on the host: in no container.
fn inspect_from_host(daemon: &common::Daemon) -> String {
    let path = daemon.endpoint().replace("unix:", "unix://");
    text(
        std::process::Command::new(env!("CARGO_BIN_EXE_tbot"))
            .args(["spiffe-inspect", "--path", &path])
            .output()
            .unwrap(),
    )
}

/// A container that sleeps with the mounts of [`inspect_from_container`]; its ID.
fn mounted(podman: &Podman, daemon: &common::Daemon, name: &str, extra: &[&str]) -> String {
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    extra.extend(mounts(daemon));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    podman.sleeper(name, &extra)
}

/// `tbot spiffe-inspect` run by `podman exec` in a [`mounted`] container.
fn exec_inspect(podman: &Podman, daemon: &common::Daemon, container: &str) -> String {
    let mut args = vec!["exec".to_owned(), container.to_owned()];
    args.extend(inspect_command(daemon));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    text(podman.command(&args).output().unwrap())
}

#[test]
fn a_process_in_a_podman_container_gets_the_identities_its_container_attests() {
    let Some(mut podman) = Podman::start() else { return };
    let engine = podman.serve();
    let daemon = daemon_with_engines(&engine);
    let td = "spiffe://quickstart.tbot.local";

    // Labelled `team=blue`: the podman identity (its rule reads the label) and the docker one, the
    // name without Docker's leading `/` (the Docker-compatible API of the same podman service).
    let blue = inspect_from_container(&podman, &daemon, "web", &["--label", "team=blue"]);
    assert!(blue.contains(&format!("- {td}/podman/web")), "{blue}\n{}", daemon.log());
    assert!(blue.contains(&format!("- {td}/docker/web")), "{blue}");
    // Without the label: the podman identity's rule does not hold.
    let red = inspect_from_container(&podman, &daemon, "api", &["--label", "team=red"]);
    assert!(!red.contains("/podman/"), "{red}");
    assert!(red.contains(&format!("- {td}/docker/api")), "{red}");
    // A host process is in no container: neither.
    let host = inspect_from_host(&daemon);
    assert!(!host.contains("/podman/") && !host.contains("/docker/"), "{host}");
    assert!(host.contains(&format!("- {td}/user/")), "{host}");

    // A container in a private cgroup namespace sees `0::/` for itself; tbot, in the host's, sees
    // the full path, so the workload cannot hide or rename its container.
    let private = inspect_from_container(
        &podman,
        &daemon,
        "private",
        &["--cgroupns", "private", "--label", "team=blue"],
    );
    assert!(private.contains(&format!("- {td}/podman/private")), "{private}");

    // In a pod: the pod's name comes from the engine (it need not appear in the cgroup path).
    podman.run(&["pod", "create", "--name", "shop", "--label", "tier=front"]);
    let in_pod = inspect_from_container(&podman, &daemon, "cart", &["--pod", "shop", "--label", "team=blue"]);
    assert!(in_pod.contains(&format!("- {td}/podman/cart")), "{in_pod}");

    // A container named like another's ID never passes for it, nor the other way round: the
    // engine's answer for an ID must carry that ID.
    let victim = mounted(&podman, &daemon, "victim", &["--label", "team=blue"]);
    let impostor = mounted(&podman, &daemon, &victim, &["--label", "team=blue"]);
    assert_ne!(impostor, victim);
    let as_victim = exec_inspect(&podman, &daemon, &victim);
    assert!(!as_victim.contains(&format!("/podman/{victim}")), "{as_victim}");
    // (Podman resolves a full ID before a name, so the real container is attested as itself.)
    assert!(as_victim.contains(&format!("- {td}/podman/victim")), "{as_victim}");
    let as_impostor = exec_inspect(&podman, &daemon, &impostor);
    assert!(!as_impostor.contains("/podman/victim"), "{as_impostor}");
    assert!(
        as_impostor.contains(&format!("- {td}/podman/{victim}")),
        "its own name: {as_impostor}"
    );

    // The engine's API stops: a container's caller gets what does not need it, and the log says why.
    podman.stop_serving();
    let _ = std::fs::remove_file(&engine);
    let unasked = inspect_from_container(&podman, &daemon, "late", &["--label", "team=blue"]);
    assert!(
        !unasked.contains("/podman/") && !unasked.contains("/docker/"),
        "{unasked}"
    );
    assert!(unasked.contains(&format!("- {td}/user/0")), "{unasked}");
    assert!(
        daemon.log().contains("the container engine cannot be asked"),
        "{}",
        daemon.log()
    );
}

#[test]
fn an_attestor_turned_off_and_on_again_takes_effect_without_a_restart() {
    let Some(mut podman) = Podman::start() else { return };
    let engine = podman.serve();
    let mut daemon = daemon_with_engines(&engine);
    let td = "spiffe://quickstart.tbot.local";
    let config = daemon.dir.path().join("etc/tbot.yaml");
    let original = std::fs::read_to_string(&config).unwrap();
    let podman_line = original
        .lines()
        .find(|l| l.trim_start().starts_with("podman: {enabled: true"))
        .unwrap()
        .to_owned();
    // Off: the podman identity is gone on the next call; the docker one stays.
    std::fs::write(&config, original.replace(&format!("{podman_line}\n"), "")).unwrap();
    let off = common::wait_until("the podman attestor off", std::time::Duration::from_secs(20), || {
        let out = inspect_from_container(&podman, &daemon, "off", &["--label", "team=blue"]);
        (!out.contains("/podman/") && out.contains(&format!("- {td}/docker/off"))).then_some(out)
    });
    assert!(off.contains("/docker/off"));
    // On again.
    std::fs::write(&config, &original).unwrap();
    common::wait_until("the podman attestor on", std::time::Duration::from_secs(20), || {
        let out = inspect_from_container(&podman, &daemon, "on", &["--label", "team=blue"]);
        out.contains(&format!("- {td}/podman/on")).then_some(())
    });
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon never restarted");
    podman.stop_serving();
}

/// A pod as the stand-in lists it: its UID, its containers (name, ID) and its init containers
/// (name, ID, restart policy).
type PodListing<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<(&'a str, &'a str, Option<&'a str>)>,
);

/// The kubelet stand-in (`tests/peers/kubelet_standin.py`), serving `pods.json` of its directory.
struct Kubelet {
    dir: tempfile::TempDir,
    child: std::process::Child,
    port: String,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kubelet {
    /// A stand-in on its secure port (`secure: true`: TLS, the token checked) or its read-only port
    /// (plain HTTP, and a request that carries a token refused).
    fn start(python: &std::path::Path, secure: bool) -> Kubelet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "kubelet-token\n").unwrap();
        let child = std::process::Command::new(python)
            .arg(common::root().join("tests/peers/kubelet_standin.py"))
            .args([
                dir.path().to_str().unwrap(),
                if secure { "kubelet-token" } else { "--read-only" },
            ])
            .spawn()
            .unwrap();
        let port = common::wait_until("the kubelet stand-in", std::time::Duration::from_secs(30), || {
            std::fs::read_to_string(dir.path().join("port")).ok()
        });
        Kubelet { dir, child, port }
    }

    /// Lists these pods from now on.
    fn list(&self, pods: &[PodListing<'_>]) {
        let image_id = format!("docker-pullable://localhost/app@sha256:{}", "ab".repeat(32));
        let pods: Vec<serde_json::Value> = pods
            .iter()
            .map(|(uid, containers, inits)| {
                serde_json::json!({
                    "uid": uid, "name": "cart-7d9f", "namespace": "shop", "service_account": "cart",
                    "labels": {"tier": "web"},
                    "containers": containers.iter().map(|(name, id)| serde_json::json!(
                        {"name": name, "id": id, "image": "localhost/app:1", "image_id": image_id})).collect::<Vec<_>>(),
                    "init_containers": inits.iter().map(|(name, id, policy)| serde_json::json!(
                        {"name": name, "id": id, "image": "localhost/app:1", "image_id": image_id, "restart_policy": policy}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let tmp = self.dir.path().join("pods.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&pods).unwrap()).unwrap();
        std::fs::rename(tmp, self.dir.path().join("pods.json")).unwrap();
    }

    /// Makes every later `GET /pods` answer `code` (or normally again with `None`).
    fn force(&self, code: Option<u16>) {
        let path = self.dir.path().join("status");
        match code {
            Some(code) => std::fs::write(path, code.to_string()).unwrap(),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn attestor(&self) -> String {
        let d = self.dir.path().display();
        self.attestor_with(&format!(
            "{{secure_port: {}, token_path: {d}/token, ca_path: {d}/ca.pem}}",
            self.port.trim()
        ))
    }

    fn attestor_with(&self, kubelet: &str) -> String {
        format!(
            "      unix: {{}}\n      kubernetes:\n        enabled: true\n        node_name: 127.0.0.1\n        pod_wait: 5s\n        \
             kubelet: {kubelet}"
        )
    }
}

/// The identity the kubernetes tests' service selects: `/k8s/<namespace>/<service account>` for the
/// containers of pods labelled `tier=web`.
const BY_POD: &str = "---\nkind: workload_identity\nversion: v1\nmetadata:\n  name: by-pod\n  labels: {app: quickstart, via: k8s}\n\
                      spec:\n  rules:\n    allow:\n      - conditions:\n          - attribute: workload.kubernetes.labels.tier\n            \
                      eq: {value: web}\n  spiffe:\n    \
                      id: \"/k8s/{{workload.kubernetes.namespace}}/{{workload.kubernetes.service_account}}\"\n";

#[test]
fn the_kubelets_read_only_port_is_asked_over_plain_http_without_a_token() {
    let Some(podman) = Podman::start() else { return };
    let Some(python) = common::venv_python("kubernetes, cryptography") else {
        return;
    };
    let kubelet = Kubelet::start(&python, false);
    let attestor = kubelet.attestor_with(&format!("{{read_only_port: {}}}", kubelet.port.trim()));
    let daemon = daemon_with("{app: quickstart, via: k8s}", &attestor, BY_POD);
    let uid = "7a0e4c1b-2d3f-4a5b-9c8d-7e6f5a4b3c2d";
    let parent = format!("/kubepods/burstable/pod{uid}");
    let app = mounted(&podman, &daemon, "app", &["--cgroup-parent", &parent]);
    kubelet.list(&[(uid, vec![("app", &app)], vec![])]);
    // The stand-in answers 400 to a request with a token: a pass shows none was sent.
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(
        got.contains("- spiffe://quickstart.tbot.local/k8s/shop/cart"),
        "{got}\n{}",
        daemon.log()
    );
}

#[test]
fn a_process_in_a_pods_container_gets_its_kubernetes_identity_from_the_kubelet() {
    let Some(podman) = Podman::start() else { return };
    let Some(python) = common::venv_python("kubernetes, cryptography") else {
        return;
    };
    let kubelet = Kubelet::start(&python, true);
    // The service selects the pod identity only, so a caller without it is denied, and the denial
    // says what the kubernetes attestor found (or why it could not ask).
    let daemon = daemon_with("{app: quickstart, via: k8s}", &kubelet.attestor(), BY_POD);
    let td = "spiffe://quickstart.tbot.local";
    let uid = "3f1c2b4a-5d6e-4f70-8a9b-0c1d2e3f4a5b";
    let parent = format!("/kubepods/besteffort/pod{uid}");
    let in_pod = |name: &str| mounted(&podman, &daemon, name, &["--cgroup-parent", &parent]);

    // A container of the pod, listed by the kubelet: its namespace and service account.
    let app = in_pod("app");
    kubelet.list(&[(uid, vec![("app", &app)], vec![])]);
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(
        got.contains(&format!("- {td}/k8s/shop/cart")),
        "{got}\n{}",
        daemon.log()
    );

    // A container listed a moment after it asks: the attestor waits for it.
    let late = in_pod("late");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            kubelet.list(&[(uid, vec![("app", &app), ("late", &late)], vec![])]);
        });
        let got = exec_inspect(&podman, &daemon, &late);
        assert!(got.contains(&format!("- {td}/k8s/shop/cart")), "{got}");
    });

    // A plain init container is not vouched for; a native sidecar is.
    let init = in_pod("init");
    let sidecar = in_pod("sidecar");
    kubelet.list(&[(
        uid,
        vec![("app", &app)],
        vec![("init", &init, None), ("sidecar", &sidecar, Some("Always"))],
    )]);
    let got = exec_inspect(&podman, &daemon, &init);
    assert!(got.contains("kubernetes: none found"), "{got}");
    let got = exec_inspect(&podman, &daemon, &sidecar);
    assert!(got.contains(&format!("- {td}/k8s/shop/cart")), "{got}");

    // A kubelet that refuses: no kubernetes identity, and the log says what to grant. (Its pod list
    // is shared for a second, so each change is looked at a second later.)
    let shared_for = || std::thread::sleep(std::time::Duration::from_millis(1100));
    kubelet.force(Some(403));
    shared_for();
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(
        got.contains(&format!(
            "kubernetes: not asked (the kubelet at https://127.0.0.1:{}/pods denied GET /pods (403)",
            kubelet.port.trim()
        )),
        "{got}"
    );
    assert!(daemon.log().contains("`get` on `nodes/proxy`"), "{}", daemon.log());
    // A token the kubelet does not take, and a kubelet that fails: the same, each said.
    std::fs::write(kubelet.dir.path().join("token"), "stale-token\n").unwrap();
    kubelet.force(None);
    shared_for();
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(!got.contains("/k8s/"), "{got}");
    assert!(daemon.log().contains("refused the token (401)"), "{}", daemon.log());
    std::fs::write(kubelet.dir.path().join("token"), "kubelet-token\n").unwrap();
    kubelet.force(Some(500));
    shared_for();
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(!got.contains("/k8s/"), "{got}");
    assert!(daemon.log().contains("answered 500"), "{}", daemon.log());
    kubelet.force(None);
    // And back: the same container gets its identity again.
    let got = exec_inspect(&podman, &daemon, &app);
    assert!(got.contains(&format!("- {td}/k8s/shop/cart")), "{got}");

    // A host process is in no pod.
    let host = inspect_from_host(&daemon);
    assert!(host.contains("kubernetes: none found"), "{host}");
}
