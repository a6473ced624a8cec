//! A real etcd cluster for tests: Debian's `etcd` binary, N members on loopback, data in a
//! temporary directory, no fsync (test data). Members can be killed and started again.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Free TCP ports on loopback (released before use; collisions are unlikely and fail loudly).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
    /// Client TLS: a directory with `ca.pem`, `server.pem`/`server.key` (for 127.0.0.1) and
    /// `client.pem`/`client.key`; clients must present a certificate the CA signed.
    tls: Option<PathBuf>,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers; `None` (after `peer_missing`)
    /// when Debian's etcd is not installed.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        EtcdCluster::start_with(n, None)
    }

    /// Like [`EtcdCluster::start`], serving clients over TLS with the certificates in `tls`.
    pub fn start_with(n: usize, tls: Option<PathBuf>) -> Option<EtcdCluster> {
        if Command::new("etcd").arg("--version").output().is_err() {
            super::peer_missing("etcd is not installed (apt-get install etcd-server); scripts/test.sh installs it");
            return None;
        }
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir: tempfile::tempdir().unwrap(),
            members,
            initial,
            tls,
        };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_healthy();
        Some(cluster)
    }

    /// The client URLs, as an `issuer` document lists them.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// `etcdctl` with the endpoints (and the client certificate, with TLS).
    fn etcdctl(&self) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints().join(",")]);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.join("ca.pem").display()))
                .arg(format!("--cert={}", tls.join("client.pem").display()))
                .arg(format!("--key={}", tls.join("client.key").display()));
        }
        command
    }

    /// `["http://…", …]` for YAML.
    pub fn endpoints_yaml(&self) -> String {
        let quoted: Vec<String> = self.endpoints().iter().map(|e| format!("\"{e}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    /// Starts member `i` (again, on its old data after a kill).
    pub fn start_member(&mut self, i: usize) {
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(self.log_path(i)).unwrap();
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.join("server.pem").display()))
                .arg(format!("--key-file={}", tls.join("server.key").display()))
                .arg(format!("--trusted-ca-file={}", tls.join("ca.pem").display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tbot-test", "--unsafe-no-fsync"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until a write commits (a leader exists and has quorum).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self
                .etcdctl()
                .args(["--command-timeout=2s", "put", "/health-check", "ok"])
                .output()
                .expect("etcdctl runs");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 30 s: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `etcdctl get --prefix PREFIX` as (key, value) pairs.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.endpoints().join(","),
                "get",
                "--prefix",
                prefix,
                "-w",
                "json",
            ])
            .output()
            .expect("etcdctl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        use base64::Engine;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .unwrap()
        };
        json["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (String::from_utf8(b64(&kv["key"])).unwrap(), b64(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
            .map(|log| log.lines().rev().take(15).collect::<Vec<_>>().join("\n"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
