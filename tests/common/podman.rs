//! A real container engine for the container attestation tests: Debian's podman with runc, every
//! piece of its state in a temporary directory (images, containers, run files), and an image built
//! from the host's static busybox with `podman import` (no registry is needed, none is reachable).
//! Default ulimits are lowered in a `containers.conf`: these hosts give root no CAP_SYS_RESOURCE,
//! and podman would ask for more open files than the hard limit. Needs root; with `CI=true` a
//! missing podman fails the test instead of skipping it (`scripts/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The image every test container runs: busybox (`sh`, `sleep`, `cat`, `ls`).
pub const IMAGE: &str = "localhost/tbot-test-busybox:1";

pub struct Podman {
    dir: tempfile::TempDir,
    service: Option<std::process::Child>,
}

fn found(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

impl Podman {
    /// A podman with its own storage and the test image, or `None` (with the reason) when this
    /// machine cannot run one.
    pub fn start() -> Option<Podman> {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if !root {
            super::peer_missing("the container tests need root (podman with runc)");
            return None;
        }
        for program in ["podman", "runc", "busybox"] {
            if found(program).is_none() {
                super::peer_missing(&format!(
                    "`{program}` is not installed; scripts/test.sh installs podman, runc and busybox-static"
                ));
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
             [engine]\nruntime = \"runc\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        let podman = Podman { dir, service: None };
        let rootfs = podman.dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(found("busybox").unwrap(), rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "cat", "ls"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tar = Command::new("tar")
            .args(["-C", rootfs.to_str().unwrap(), "-cf", "-", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let mut import = podman
            .command(&["import", "--change", "LABEL org.example.app=tbot-test", "-", IMAGE])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut import.stdin.take().unwrap(), &tar.stdout).unwrap();
        let out = import.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(podman)
    }

    /// `podman` with this instance's storage and configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(args);
        command
    }

    /// Runs podman and returns its trimmed stdout, failing the test on an error.
    pub fn run(&self, args: &[&str]) -> String {
        let out: Output = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts a container that sleeps, with `extra` options; returns its ID.
    pub fn sleeper(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name, "--network", "none"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "/bin/sleep", "600"]);
        self.run(&args)
    }

    /// A field of `podman inspect` (a Go template such as `{{.State.Pid}}`).
    pub fn inspect(&self, what: &str, format: &str) -> String {
        self.run(&["inspect", "--format", format, what])
    }
}

impl Podman {
    /// Starts `podman system service` (its REST API: libpod and Docker-compatible) on a socket in
    /// this instance's directory, and returns the socket's path once the engine answers.
    pub fn serve(&mut self) -> PathBuf {
        let socket = self.dir.path().join("podman.sock");
        let child = self
            .command(&[
                "system",
                "service",
                "--time",
                "0",
                &format!("unix://{}", socket.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.service = Some(child);
        super::wait_until("podman's API socket", std::time::Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).ok().map(drop)
        });
        socket
    }

    /// Stops the API service (the engine's containers keep running: podman has no daemon).
    pub fn stop_serving(&mut self) {
        if let Some(mut child) = self.service.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.stop_serving();
        let _ = self.command(&["pod", "rm", "-a", "-f", "-t", "0"]).output();
        let _ = self.command(&["rm", "-a", "-f", "-t", "0"]).output();
        // Overlay mounts under the storage directory must go before the directory can.
        let _ = self.command(&["system", "reset", "-f"]).output();
    }
}
