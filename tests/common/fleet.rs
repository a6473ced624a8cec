//! Two real daemons on loopback: an issuer host (a copy of `manifests/fleet/issuer` on a free port)
//! and agents of it (only a `tbot.yaml`, each in its own directory), as `tests/fleet.rs` and the
//! `iam` tests use them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Daemon, copy_manifests, free_port, stdout, tbotctl};

/// The issuer host: its daemon, its port and its CA pin.
pub struct Issuer {
    pub daemon: Daemon,
    pub port: u16,
    pub pin: String,
}

impl Issuer {
    /// Starts a copy of `manifests/fleet/issuer` on a free port with its storage in the copy, the
    /// workload identity's SPIFFE ID template replaced by `template`, and `edits` applied.
    pub fn start(template: &str, edits: &[(&str, &str, &str)]) -> Issuer {
        let port = free_port();
        let listen = format!("listen: 127.0.0.1:{port}");
        let addrs = format!("public_addrs: [\"127.0.0.1:{port}\"]\n  admin_socket: DIR/admin.sock");
        let id = format!("id: \"{template}\"");
        let mut all: Vec<(&str, &str, &str)> = vec![
            ("issuer.yaml", "listen: 127.0.0.1:3025", &listen),
            (
                "issuer.yaml",
                "public_addrs: [\"127.0.0.1:3025\", \"localhost:3025\"]",
                &addrs,
            ),
            ("issuer.yaml", "path: /tmp/tbot-fleet/issuer", "path: DIR/state"),
            (
                "workload-identity.yaml",
                "id: \"/svc/{{workload.systemd.service}}\"",
                &id,
            ),
        ];
        all.extend_from_slice(edits);
        let (dir, _) = copy_manifests("manifests/fleet/issuer", &all);
        let admin = dir.path().join("admin.sock");
        let daemon = Daemon::start(dir, admin);
        let pin = pin_of(&daemon);
        Issuer { daemon, port, pin }
    }

    /// Stops it with SIGKILL and starts it again on the same directory (same CA, same ledgers).
    pub fn kill_and_restart(self) -> Issuer {
        let Issuer { daemon, port, pin } = self;
        let (dir, admin) = daemon.crash();
        let _ = std::fs::remove_file(&admin);
        Issuer {
            daemon: Daemon::start(dir, admin),
            port,
            pin,
        }
    }

    pub fn etc(&self) -> PathBuf {
        self.daemon.dir.path().join("etc")
    }

    /// Where the issuer keeps its first CA certificate (DER).
    pub fn ca_path(&self) -> PathBuf {
        self.daemon.dir.path().join("state/issuer/example.teleport.sh/ca-1.der")
    }

    /// The issuer's first CA certificate (DER).
    pub fn ca_der(&self) -> Vec<u8> {
        std::fs::read(self.ca_path()).unwrap()
    }

    /// `tbotctl status` on the issuer's directory.
    pub fn status(&self) -> String {
        stdout(&self.daemon.tbotctl(&["status"]))
    }
}

/// The `CA pin:` line of `tbotctl status`.
pub fn pin_of(daemon: &Daemon) -> String {
    let out = stdout(&daemon.tbotctl(&["status"]));
    out.lines()
        .find_map(|l| l.strip_prefix("CA pin: "))
        .unwrap_or_else(|| panic!("no CA pin in:\n{out}"))
        .to_owned()
}

/// An agent config for the issuer on `port`: `onboarding` as given, storage and sockets under `dir`.
pub fn agent_config(dir: &Path, port: u16, onboarding: &str, selector: &str) -> String {
    format!(
        "version: v2\nproxy_server: 127.0.0.1:{port}\nonboarding:\n{onboarding}\
         storage:\n  type: directory\n  path: {dir}/state\nadmin_socket: {dir}/admin.sock\n\
         services:\n  - type: workload-identity-api\n    listen: unix://{dir}/workload.sock\n\
         \x20   selector:\n      name: {selector}\n    attestors:\n      systemd:\n        enabled: true\n",
        dir = dir.display()
    )
}

/// The onboarding of a `token` agent pinned to `pin`.
pub fn token_onboarding(token: &str, pin: &str) -> String {
    format!("  join_method: token\n  token: {token}\n  ca_pins: [\"{pin}\"]\n")
}

/// Starts an agent from only a `tbot.yaml`, waiting for its admin socket (not its workload socket:
/// an agent that cannot join has none). `env` goes to the daemon.
pub fn start_agent(config: impl Fn(&Path) -> String, env: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("tbot.yaml"), config(dir.path())).unwrap();
    let socket = dir.path().join("workload.sock");
    let admin = dir.path().join("admin.sock");
    let mut daemon = Daemon::spawn(dir, socket, env);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&admin).is_err() {
        if let Ok(Some(status)) = daemon_exited(&mut daemon) {
            panic!("the agent exited with {status}:\n{}", daemon.log());
        }
        assert!(
            Instant::now() < deadline,
            "no admin socket after 30s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

fn daemon_exited(daemon: &mut Daemon) -> std::io::Result<Option<std::process::ExitStatus>> {
    daemon.try_wait()
}

/// Polls `tbotctl status` on `daemon` until `want` holds (30 s).
pub fn wait_for_status(daemon: &Daemon, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stdout(&daemon.tbotctl(&["status"]));
        if want(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "{what}:\n{out}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the workload socket of `daemon` answers (30 s).
pub fn wait_for_socket(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "no workload socket after 30s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tbotctl` on an explicit directory.
pub fn tbotctl_dir(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--dir", dir.to_str().unwrap()]);
    tbotctl(&all)
}

/// The `CA` column of the issuer's agent table, for every connected agent.
pub fn agent_cas(status: &str) -> Vec<String> {
    let mut lines = status
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("BOT/INSTANCE"));
    let Some(header) = lines.next() else { return vec![] };
    let at = header.find(" CA ").expect("a CA column") + 1;
    lines
        .take_while(|l| l.starts_with("  ") && !l.trim_start().starts_with("REFUSED"))
        .map(|l| l[at..].split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}
