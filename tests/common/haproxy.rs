//! haproxy (Debian's) in front of issuer replicas, as a production TCP load balancer would be:
//! TLS passes through, health checks every 200 ms. Shared by the tests and the benchmarks.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

/// Starts haproxy on 127.0.0.1:`port` balancing over 127.0.0.1:`backends`; `None` (after
/// `peer_missing`) when haproxy is not installed. With `send_proxy`, every connection to a backend
/// (health checks too) starts with a PROXY protocol v2 header.
pub fn start(port: u16, backends: &[u16], send_proxy: bool) -> Option<Haproxy> {
    if Command::new("haproxy").arg("-v").output().is_err() {
        super::peer_missing("haproxy is not installed (apt-get install haproxy); scripts/test.sh installs it");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let proxy = if send_proxy {
                " send-proxy-v2 check-send-proxy"
            } else {
                ""
            };
            format!("    server r{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 1{proxy}\n")
        })
        .collect();
    let config = format!(
        "global\n    maxconn 4000\ndefaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1h\n    \
         timeout server 1h\n    retries 3\n    option redispatch\nfrontend issuers\n    bind 127.0.0.1:{port}\n    \
         default_backend replicas\nbackend replicas\n    balance leastconn\n{servers}"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let log_path = dir.path().join("haproxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("haproxy starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "haproxy does not listen on {port}:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Haproxy { child, _dir: dir })
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
