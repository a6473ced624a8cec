//! The README's "Try a fleet on one machine", run as written: the commands between its
//! `fleet-try` markers, with `cargo run --bin X --` standing for the built `X`. Each `start` runs in
//! the background until it tells systemd it is ready (`NOTIFY_SOCKET`), as it would in its own
//! terminal; the other lines run in one shell each group, so `pin=…` carries to the next line. The
//! last command must show a shell process its SVID.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

/// The README's commands, with `cargo run` replaced by the built binaries.
fn commands() -> Vec<String> {
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let start = readme.find("<!-- fleet-try:start -->").expect("the start marker");
    let end = readme.find("<!-- fleet-try:end -->").expect("the end marker");
    readme[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("```") && !l.starts_with("<!--"))
        .map(|l| {
            l.replace("cargo run -q --bin tbotctl --", env!("CARGO_BIN_EXE_tbotctl"))
                .replace("cargo run -q --bin tbot --", env!("CARGO_BIN_EXE_tbot"))
                .replace("cargo run --bin tbot --", env!("CARGO_BIN_EXE_tbot"))
        })
        .collect()
}

fn shell(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-ec", script])
        .current_dir(common::root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\nfailed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_readme_fleet_commands_run_as_written_and_end_with_an_svid_for_a_shell() {
    let commands = commands();
    assert!(commands.len() >= 5, "{commands:#?}");
    assert!(
        commands.iter().all(|c| !c.contains("cargo ")),
        "a command the test cannot map: {commands:#?}"
    );
    // The walkthrough's own paths: start afresh.
    let _ = std::fs::remove_dir_all("/tmp/tbot-fleet");
    let notify_dir = tempfile::tempdir().unwrap();
    let mut daemons = Daemons(Vec::new());
    let mut pending = String::new();
    let mut last = String::new();
    for command in &commands {
        if !command.contains(" start --config-dir ") {
            pending.push_str(command);
            pending.push('\n');
            continue;
        }
        if !pending.is_empty() {
            last = shell(&std::mem::take(&mut pending));
        }
        let notify_path = notify_dir.path().join(format!("notify-{}", daemons.0.len()));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let log = std::fs::File::create(notify_dir.path().join(format!("log-{}", daemons.0.len()))).unwrap();
        let child = Command::new("bash")
            .args(["-c", &format!("exec {command}")])
            .current_dir(common::root())
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        daemons.0.push(child);
        let mut buf = [0u8; 256];
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("`{command}` never got ready: {e}"));
        assert_eq!(&buf[..n], b"READY=1", "{command}");
    }
    if !pending.is_empty() {
        last = shell(&pending);
    }
    assert!(
        last.contains("- spiffe://example.teleport.sh/user/"),
        "the shell got no SVID:\n{last}"
    );
    drop(daemons);
    let _ = std::fs::remove_dir_all("/tmp/tbot-fleet");
}
