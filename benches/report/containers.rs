//! `containers`: the first `FetchX509SVID` message for a caller in a podman container (the engine
//! asked, then its answer cached) beside the same for a host process, on one daemon whose service has
//! the podman attestor on a real `podman system service`.
//!
//! The caller in the container is this process itself, moved into the container's cgroups the way
//! `podman exec` puts a process into them (it stays in the host's mount and network namespaces, so
//! it reaches the daemon's socket and times itself without a process start in the figure). The
//! daemon finds the container from `/proc/<pid>/cgroup` and asks the engine, as for any caller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::podman::Podman;
use crate::{Row, Scale, common, percentile};

/// Appended to the service of [`common::write_directory`]'s agent config.
fn attestor(socket: &Path) -> String {
    format!(
        "    attestors:\n      podman:\n        enabled: true\n        addr: unix://{}\n",
        socket.display()
    )
}

/// An identity only a caller the podman attestor vouched for holds: its first message then carries
/// two SVIDs, which shows the engine was asked and answered.
const IN_A_CONTAINER: &str = "kind: workload_identity
version: v1
metadata:
  name: in-a-container
  labels:
    app: bench
spec:
  rules:
    allow:
      - conditions:
          - attribute: workload.podman.attested
            eq:
              value: \"true\"
  spiffe:
    id: /in-a-container
";

pub async fn run(scale: Scale) -> Vec<Row> {
    let Some(mut podman) = Podman::start() else {
        return Vec::new();
    };
    let engine = podman.serve();
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let socket = dir.path().join("workload.sock");
    common::write_directory(&etc, 1, &socket, &dir.path().join("state"), common::my_uid());
    let agent = etc.join("00-agent.yaml");
    let text = std::fs::read_to_string(&agent).unwrap() + &attestor(&engine);
    std::fs::write(&agent, text).unwrap();
    std::fs::write(etc.join("wi-container.yaml"), IN_A_CONTAINER).unwrap();
    let mut daemon = common::start_tbot(&etc, &dir.path().join("daemon.log"), &socket).await;
    let address = format!("unix://{}", socket.display());

    let n = scale.pick(50, 3);
    let host = common::first_messages(&address, n).await;

    // The first caller of any container mints the container identity's SVID; later containers find
    // it in the agent's cache, as the host process finds its own. Then each container is new to the
    // engine's cache: its first call asks the engine, the calls right after are answered from the
    // cache (kept for 2 s).
    let containers = scale.pick(8, 1);
    let mut asked = Vec::with_capacity(containers);
    let mut cached = Vec::with_capacity(containers * n);
    for k in 0..=containers {
        let name = format!("bench-{k}");
        podman.sleeper(&name, &[]);
        let pid = podman.inspect(&name, "{{.State.Pid}}");
        {
            let _inside = Inside::cgroups_of(&pid);
            let first = common::first_messages(&address, 1).await;
            let svids = svid_count(&address).await;
            assert_eq!(svids, 2, "the podman attestor vouched for the caller in `{name}`");
            if k > 0 {
                asked.extend(first);
                cached.extend(common::first_messages(&address, n).await);
            }
        }
        podman.run(&["rm", "-f", "-t", "0", &name]);
    }
    common::terminate(&mut daemon);
    asked.sort();
    cached.sort();
    let host_p50 = percentile(&host, 0.5);
    vec![
        Row::duration(
            "containers",
            format!(
                "first `FetchX509SVID` message, a caller in a podman container, the engine asked (p50 of {containers} containers)"
            ),
            percentile(&asked, 0.5),
            "the same for a host process (p50)",
            host_p50,
        ),
        Row::duration(
            "containers",
            format!("the same, the engine's answer cached (p50 of {} calls)", cached.len()),
            percentile(&cached, 0.5),
            "the same for a host process (p50)",
            host_p50,
        ),
    ]
}

/// How many SVIDs a new connection's first `FetchX509SVID` message carries.
async fn svid_count(address: &str) -> usize {
    use tbot::workload_api::client;
    use tbot::workload_api::proto::X509svidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio_stream::StreamExt;
    let channel = client::connect(address).await.unwrap();
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a first message within 30 s")
        .unwrap()
        .unwrap()
        .svids
        .len()
}

/// This process in another process's cgroups (every hierarchy) until dropped; then back in its own.
struct Inside {
    own: String,
}

impl Inside {
    fn cgroups_of(pid: &str) -> Inside {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        move_into(&theirs);
        Inside { own }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        move_into(&self.own);
    }
}

/// Writes this process's ID into the `cgroup.procs` of each `N:controllers:/path` line of `lines`.
fn move_into(lines: &str) {
    let mounts = cgroup_mounts();
    for line in lines.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        let Some((mount, _)) = mounts.iter().find(|(_, options)| match options {
            None => wanted.is_empty(),
            Some(options) => !wanted.is_empty() && wanted.iter().all(|w| options.contains(&w.to_string())),
        }) else {
            continue;
        };
        let procs = mount.join(path.trim_start_matches('/')).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("moving the bench into {}: {e}", procs.display()));
    }
}

/// Each cgroup mount: where, and for a v1 hierarchy its options (controllers, `name=`); `None` for
/// cgroup2.
fn cgroup_mounts() -> Vec<(PathBuf, Option<Vec<String>>)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = PathBuf::from(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let (kind, _, options) = (right.next()?, right.next()?, right.next()?);
            match kind {
                "cgroup2" => Some((mount, None)),
                "cgroup" => Some((mount, Some(options.split(',').map(str::to_owned).collect()))),
                _ => None,
            }
        })
        .collect()
}
