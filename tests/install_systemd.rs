//! `tbot install systemd`: the printed unit, writing it, and refusing to overwrite a different one.

mod common;

use std::process::{Command, Output};

fn tbot(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tbot")).args(args).output().unwrap()
}

/// A user that exists on any Linux machine, for the tests that write a unit.
const ROOT: [&str; 4] = ["--user", "root", "--group", "root"];

#[test]
fn the_unit_runs_the_installed_tbot_under_type_notify_idle_until_the_documents_exist() {
    let out = tbot(&[
        "install",
        "systemd",
        "--config",
        "/etc/tbot.yaml",
        "--exe",
        "/usr/bin/tbot",
    ]);
    assert!(out.status.success());
    let unit = common::stdout(&out);
    for line in [
        "Type=notify",
        "User=tbot",
        "Group=tbot",
        "ExecStart=/usr/bin/tbot start -c /etc/tbot.yaml",
        "ConditionPathExists=/etc/tbot.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "RestartSec=5",
        "LimitNOFILE=524288",
        "RuntimeDirectory=tbot",
        "StateDirectory=tbot",
        "StateDirectoryMode=0700",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(line), "missing {line:?} in\n{unit}");
    }
    // A directory, which need not exist where the unit is made (the package builder's machine).
    let out = tbot(&[
        "install",
        "systemd",
        "--config",
        "/etc/tbot.d",
        "--exe",
        "/usr/bin/tbot",
    ]);
    let unit = common::stdout(&out);
    assert!(
        unit.contains("ExecStart=/usr/bin/tbot start --config-dir /etc/tbot.d"),
        "{unit}"
    );
    assert!(unit.contains("ConditionPathExistsGlob=|/etc/tbot.d/*.yaml"), "{unit}");
}

#[test]
fn a_tbot_in_a_build_tree_is_not_what_the_unit_runs() {
    // This test's tbot is target/debug/tbot: the unit names an installed one, or says to install.
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["install", "systemd", "--config", "/etc/tbot.d"])
        .env("CARGO_HOME", "/nonexistent")
        .output()
        .unwrap();
    let unit = common::stdout(&out);
    if std::path::Path::new("/usr/bin/tbot").is_file() || std::path::Path::new("/usr/local/bin/tbot").is_file() {
        assert!(out.status.success());
        assert!(!unit.contains("target/debug"), "{unit}");
    } else {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("runs from a build tree") && err.contains("--exe"), "{err}");
    }
}

#[test]
fn writing_refuses_a_user_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = tbot(&[
        "install",
        "systemd",
        "--config",
        "/etc/tbot.d",
        "--exe",
        "/usr/bin/tbot",
        "--user",
        "no-such-user-tbot-test",
        "--write",
        "--systemd-directory",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`no-such-user-tbot-test` does not exist") && err.contains("adduser --system"),
        "{err}"
    );
    assert!(!dir.path().join("tbot.service").exists());
}

#[test]
fn writing_refuses_a_different_unit_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().to_str().unwrap();
    let write = |config: &str, force: bool| {
        let mut args = vec![
            "install",
            "systemd",
            "--config",
            config,
            "--exe",
            "/usr/bin/tbot",
            "--write",
            "--systemd-directory",
            sd,
        ];
        args.extend(ROOT);
        if force {
            args.push("--force");
        }
        tbot(&args)
    };
    let first = write("/etc/a.yaml", false);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(common::stdout(&first).contains("systemctl daemon-reload"));
    assert!(
        write("/etc/a.yaml", false).status.success(),
        "the same unit again is fine"
    );
    let refused = write("/etc/b.yaml", false);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let unit = std::fs::read_to_string(dir.path().join("tbot.service")).unwrap();
    assert!(unit.contains("-c /etc/a.yaml"), "unchanged: {unit}");
    assert!(write("/etc/b.yaml", true).status.success());
    let unit = std::fs::read_to_string(dir.path().join("tbot.service")).unwrap();
    assert!(unit.contains("-c /etc/b.yaml"));
}

#[test]
fn the_daemon_tells_systemd_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let (dir, _socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_IN_MEMORY);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--config-dir"])
        .arg(dir.path().join("etc"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    let pid = child.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// The open-file limit of a running process: (soft, hard).
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[test]
fn tbot_started_by_hand_raises_its_open_file_limit_as_the_unit_does() {
    // A shell's soft limit (here 256) would cap an issuer at a few hundred agents.
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_IN_MEMORY);
    let log = std::fs::File::create(dir.path().join("tbot.log")).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" start --config-dir \"$1\"")
        .arg(env!("CARGO_BIN_EXE_tbot"))
        .arg(dir.path().join("etc"))
        .stderr(log)
        .spawn()
        .unwrap();
    common::wait_until("the daemon's socket", std::time::Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });
    let (soft, hard) = open_files_limit(child.id());
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    // To the hard limit, or the unit's LimitNOFILE when the hard one is higher.
    let hard: u64 = hard.parse().unwrap_or(u64::MAX);
    let want = hard.min(tbot::cli::tbot::OPEN_FILES);
    assert_eq!(soft, want.to_string(), "the soft limit is raised towards the hard one");
    assert_ne!(soft, "256");
}
