//! Issuer replicas on one etcd cluster, behind haproxy, as `tests/ha.rs` runs them: each replica a
//! real `tbot start` on a copy of `manifests/fleet/issuer` whose `issuer` document names etcd, the
//! shared key encryption key, and its own port and admin socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::etcd::{EtcdCluster, free_ports};
use super::{Daemon, copy_manifests, stdout};

/// The `issuer` document of replica `name` on `port`, storing in the etcd at `endpoints`.
pub fn issuer_document(name: &str, port: u16, public: &[String], endpoints: &str, prefix: &str, kek: &Path) -> String {
    let public: Vec<String> = public.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "kind: issuer\nversion: v1\nmetadata:\n  name: {name}\nspec:\n  listen: 127.0.0.1:{port}\n  \
         public_addrs: [{}]\n  storage:\n    type: etcd\n    endpoints: {endpoints}\n    prefix: {prefix}\n    \
         key_encryption_key_file: {}\n  admin_socket: DIR/admin.sock\n",
        public.join(", "),
        kek.display()
    )
}

/// Writes a key encryption key file: 32 random bytes, `0600`.
pub fn write_kek(path: &Path) {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub struct Replica {
    pub daemon: Daemon,
    pub port: u16,
    pub name: String,
}

/// Three (or more) replicas on one etcd, with a shared key file and an haproxy address.
pub struct Replicas {
    pub etcd: EtcdCluster,
    pub replicas: Vec<Option<Replica>>,
    pub kek: PathBuf,
    pub prefix: String,
    /// The load balancer's port (haproxy, when started).
    pub lb_port: u16,
    ports: Vec<u16>,
    /// The replicas read a PROXY v2 header on every connection (and haproxy sends one).
    proxy_protocol: bool,
    _keys: tempfile::TempDir,
    haproxy: Option<super::haproxy::Haproxy>,
}

impl Replicas {
    /// Starts a 3-member etcd and `n` replicas at once (they race to create the CA). `None` when
    /// etcd is not installed (outside CI).
    pub fn start(n: usize) -> Option<Replicas> {
        Replicas::start_with(n, false)
    }

    /// Like [`Replicas::start`], with `issuer.spec.proxy_protocol` set as given.
    pub fn start_with(n: usize, proxy_protocol: bool) -> Option<Replicas> {
        Replicas::start_edited(n, proxy_protocol, &[])
    }

    /// Like [`Replicas::start_with`], with `edits` (file, from, to) on every replica's documents.
    pub fn start_edited(n: usize, proxy_protocol: bool, edits: &[(&str, &str, &str)]) -> Option<Replicas> {
        let etcd = EtcdCluster::start(3)?;
        let keys = tempfile::tempdir().unwrap();
        let kek = keys.path().join("issuer.kek");
        write_kek(&kek);
        let mut ports = free_ports(n + 1);
        let lb_port = ports.pop().unwrap();
        let mut set = Replicas {
            etcd,
            replicas: (0..n).map(|_| None).collect(),
            kek,
            prefix: "/tbot".into(),
            lb_port,
            ports,
            proxy_protocol,
            _keys: keys,
            haproxy: None,
        };
        // All at once: no ordering helps any of them create the CA first.
        let spawned: Vec<Replica> = (0..n).map(|i| set.spawn(i, edits)).collect();
        for (i, replica) in spawned.into_iter().enumerate() {
            set.replicas[i] = Some(wait_ready(replica));
        }
        Some(set)
    }

    /// Starts replica `i` without waiting, with `edits` (file, from, to) on its documents.
    pub fn spawn(&self, i: usize, edits: &[(&str, &str, &str)]) -> Replica {
        let name = format!("replica-{}", i + 1);
        let port = self.ports[i];
        let public = [format!("127.0.0.1:{}", self.lb_port), format!("127.0.0.1:{port}")];
        let mut all = vec![(
            "workload-identity.yaml",
            "id: \"/svc/{{workload.systemd.service}}\"",
            "id: \"/uid/{{workload.unix.uid}}\"",
        )];
        all.extend_from_slice(edits);
        let (dir, _) = copy_manifests("manifests/fleet/issuer", &all);
        // More single-use tokens for the tests' newcomers.
        let tokens: String = ["second-token", "third-token"]
            .iter()
            .map(|name| {
                format!(
                    "kind: token\nversion: v2\nmetadata:\n  name: {name}\nspec:\n  roles: [Bot]\n  \
                     join_method: token\n  bot_name: example-bot\n---\n"
                )
            })
            .collect();
        std::fs::write(dir.path().join("etc/more-tokens.yaml"), tokens).unwrap();
        let mut document = issuer_document(
            &name,
            port,
            &public,
            &self.etcd.endpoints_yaml(),
            &self.prefix,
            &self.kek,
        )
        .replace("DIR", &dir.path().display().to_string());
        if self.proxy_protocol {
            document.push_str("  proxy_protocol: true\n");
        }
        std::fs::write(dir.path().join("etc/issuer.yaml"), document).unwrap();
        let admin = dir.path().join("admin.sock");
        Replica {
            daemon: Daemon::spawn(dir, admin, &[]),
            port,
            name,
        }
    }

    /// Replica `i`, which must be running.
    pub fn get(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("the replica runs")
    }

    /// SIGKILLs replica `i`, keeping its directory for a restart.
    pub fn kill(&mut self, i: usize) -> (tempfile::TempDir, PathBuf) {
        let replica = self.replicas[i].take().expect("the replica runs");
        replica.daemon.crash()
    }

    /// Starts replica `i` again on its directory (after [`Replicas::kill`]).
    pub fn restart(&mut self, i: usize, dir: tempfile::TempDir, admin: PathBuf) {
        let _ = std::fs::remove_file(&admin);
        let replica = Replica {
            daemon: Daemon::spawn(dir, admin, &[]),
            port: self.ports[i],
            name: format!("replica-{}", i + 1),
        };
        self.replicas[i] = Some(wait_ready(replica));
    }

    /// `tbotctl status` of replica `i`.
    pub fn status(&self, i: usize) -> String {
        stdout(&self.get(i).daemon.tbotctl(&["status"]))
    }

    /// Starts haproxy on `lb_port` in front of every replica. `None` when haproxy is not
    /// installed (outside CI).
    pub fn start_haproxy(&mut self) -> Option<()> {
        self.haproxy = Some(super::haproxy::start(self.lb_port, &self.ports, self.proxy_protocol)?);
        Some(())
    }
}

/// Waits until a replica's admin socket answers and it reports a CA pin.
pub fn wait_ready(mut replica: Replica) -> Replica {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = replica.daemon.try_wait() {
            panic!("{} exited with {status}:\n{}", replica.name, replica.daemon.log());
        }
        let out = stdout(&replica.daemon.tbotctl(&["status"]));
        if out.contains("CA pin: ") && out.contains("replica") {
            return replica;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready in 60 s:\n{out}\n{}",
            replica.name,
            replica.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
