//! Installing tbot the way fleets install agents: the build needs no `protoc`, and the Debian
//! package from `scripts/package.sh` installs, runs as its `tbot` user, serves a py-spiffe client,
//! and goes away (conffiles stay on removal, everything on purge); the release tarball checks out.
//! Both need root (a mount namespace; `dpkg -i`), as on CI; elsewhere they are skipped.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// `cargo check` of the whole crate in a fresh target directory, in a mount namespace where
/// `protoc` (if the machine has one) is `/dev/null` and `PROTOC` points nowhere: every build
/// script runs, and none may need it.
#[test]
fn the_build_needs_no_protoc() {
    if !is_root() {
        common::peer_missing("the protoc-free build check needs root (a mount namespace)");
        return;
    }
    let target = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let hide = match which("protoc") {
        Some(protoc) => format!("mount --bind /dev/null {} && ", protoc.display()),
        None => String::new(),
    };
    let script = format!(
        "{hide}PROTOC=/nonexistent/protoc exec {cargo} check --locked --quiet --bins --target-dir {}",
        target.path().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .current_dir(common::root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the build needed something missing:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the package if a failed run left it installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-u", "tbot", "-f", "tbot start"]).status();
        for f in ["tbot.yaml", "cluster.yaml", "bot.yaml", "workload-identity.yaml"] {
            let _ = std::fs::remove_file(Path::new("/etc/tbot.d").join(f));
        }
        let _ = Command::new("dpkg").args(["-P", "tbot"]).output();
    }
}

fn mode_owner(path: &str) -> (u32, String) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let owner = ok("stat", &["-c", "%U:%G", path]).trim().to_owned();
    (meta.permissions().mode() & 0o7777, owner)
}

#[test]
fn the_debian_package_installs_runs_as_its_user_and_goes_away() {
    if !is_root() || which("dpkg").is_none() {
        common::peer_missing("the package test needs root and dpkg");
        return;
    }
    if run("dpkg", &["-s", "tbot"]).status.success() {
        common::peer_missing("a tbot package is installed on this machine; the test does not replace it");
        return;
    }
    let Some(python) = common::venv_python("spiffe, grpc") else {
        return;
    };
    let binaries = Path::new(env!("CARGO_BIN_EXE_tbot")).parent().unwrap().to_owned();
    let root = common::root();
    let out = Command::new(root.join("scripts/package.sh"))
        .env("TBOT_PACKAGE_BINARIES", &binaries)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let arch = ok("dpkg", &["--print-architecture"]).trim().to_owned();
    let version = ok(env!("CARGO_BIN_EXE_tbot"), &["--version"]);
    let version = version.split_whitespace().nth(1).unwrap().to_owned();
    let package = root.join(format!("target/package/tbot_{version}_{arch}.deb"));
    let deb = package.to_str().unwrap();

    // lintian finds no error.
    match which("lintian") {
        Some(_) => {
            let out = run("lintian", &["--fail-on", "error", deb]);
            assert!(
                out.status.success(),
                "lintian:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        None => common::peer_missing("lintian is not installed (scripts/test.sh installs it)"),
    }

    let _cleanup = Installed;
    ok("dpkg", &["-i", deb]);
    // What goes where, with its owner and mode.
    ok("getent", &["passwd", "tbot"]);
    for bin in ["/usr/bin/tbot", "/usr/bin/tbotctl"] {
        assert_eq!(mode_owner(bin), (0o755, "root:root".into()), "{bin}");
    }
    assert_eq!(mode_owner("/var/lib/tbot"), (0o700, "tbot:tbot".into()));
    assert_eq!(mode_owner("/run/tbot").1, "tbot:tbot");
    assert!(Path::new("/usr/share/tbot/schemas/workload_identity.schema.json").is_file());
    let conffiles = std::fs::read_to_string("/var/lib/dpkg/info/tbot.conffiles").unwrap();
    assert!(
        conffiles.contains("/etc/tbot.d/examples/single-host/tbot.yaml"),
        "{conffiles}"
    );
    let installed_version = ok("/usr/bin/tbot", &["--version"]);
    assert!(
        installed_version.starts_with(&format!("tbot {version} (commit ")),
        "{installed_version}"
    );
    assert!(ok("/usr/bin/tbotctl", &["--version"]).starts_with("tbotctl "));
    // The unit: what `tbot install systemd` writes for it, and systemd accepts it.
    let unit = std::fs::read_to_string("/lib/systemd/system/tbot.service").unwrap();
    for line in [
        "Type=notify",
        "User=tbot",
        "ExecStart=/usr/bin/tbot start --config-dir /etc/tbot.d",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ConditionPathExistsGlob=|/etc/tbot.d/*.yaml",
    ] {
        assert!(unit.contains(line), "{line} in\n{unit}");
    }
    match which("systemd-analyze") {
        Some(_) => {
            ok("systemd-analyze", &["verify", "/lib/systemd/system/tbot.service"]);
        }
        None => common::peer_missing("systemd-analyze is not installed"),
    }
    // The examples validate, and the single host one serves: the installed tbot, started by hand
    // as the `tbot` user, gives a py-spiffe client its SVID.
    for example in ["single-host", "agent", "issuer"] {
        ok(
            "/usr/bin/tbotctl",
            &["validate", "--dir", &format!("/etc/tbot.d/examples/{example}")],
        );
    }
    for f in ["tbot.yaml", "cluster.yaml", "bot.yaml", "workload-identity.yaml"] {
        std::fs::copy(
            format!("/etc/tbot.d/examples/single-host/{f}"),
            format!("/etc/tbot.d/{f}"),
        )
        .unwrap();
    }
    let mut daemon = Command::new("runuser")
        .args([
            "-u",
            "tbot",
            "--",
            "/usr/bin/tbot",
            "start",
            "--config-dir",
            "/etc/tbot.d",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = Path::new("/run/tbot/workload.sock");
    common::wait_until("the installed tbot's socket", Duration::from_secs(30), || {
        socket.exists().then_some(())
    });
    let fetched = Command::new(&python)
        .arg(root.join("tests/peers/spiffe_peer.py"))
        .args(["once", "/run/tbot/workload.sock"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&fetched.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&fetched.stderr)));
    assert_eq!(report["spiffe_id"], "spiffe://tbot.example.internal/user/0", "{report}");
    assert_eq!(
        mode_owner("/var/lib/tbot/agent").1,
        "tbot:tbot",
        "the state is the tbot user's"
    );
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    for f in ["tbot.yaml", "cluster.yaml", "bot.yaml", "workload-identity.yaml"] {
        std::fs::remove_file(format!("/etc/tbot.d/{f}")).unwrap();
    }

    // Removal keeps the conffiles and the state; purge removes both.
    ok("dpkg", &["-r", "tbot"]);
    assert!(!Path::new("/usr/bin/tbot").exists());
    assert!(Path::new("/etc/tbot.d/examples/single-host/tbot.yaml").is_file());
    assert!(Path::new("/var/lib/tbot/agent").is_dir());
    ok("dpkg", &["-P", "tbot"]);
    assert!(!Path::new("/etc/tbot.d").exists());
    assert!(!Path::new("/var/lib/tbot").exists());

    // The tarball and its checksums.
    let dir = root.join("target/package");
    let name = format!("tbot-{version}-linux-{arch}");
    let out = Command::new("sha256sum")
        .args(["-c", &format!("{name}.tar.gz.sha256")])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let unpacked = tempfile::tempdir().unwrap();
    ok(
        "tar",
        &[
            "-xzf",
            dir.join(format!("{name}.tar.gz")).to_str().unwrap(),
            "-C",
            unpacked.path().to_str().unwrap(),
        ],
    );
    let tree = unpacked.path().join(&name);
    for f in [
        "tbot",
        "tbotctl",
        "tbot.service",
        "examples/single-host/tbot.yaml",
        "schemas/bot.schema.json",
    ] {
        assert!(tree.join(f).is_file(), "{f} in the tarball");
    }
    let out = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&tree)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
