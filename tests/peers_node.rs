//! The real daemon talked to by a JavaScript client: @grpc/grpc-js, a gRPC implementation of its own
//! (not grpc C-core, not tonic), with its default `:authority` on a unix socket and forms that are
//! not a URI authority. The peer is `tests/peers/node/spiffe_peer.js`; `scripts/test.sh` installs
//! its packages into `target/test-node`. With `CI=true` a missing peer fails the test.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The peer's `node_modules`, when node and the packages are there.
fn node_modules() -> Option<PathBuf> {
    let dir = common::peer_dir("TBOT_TEST_NODE_MODULES", "target/test-node/node_modules");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if node && dir.join("@grpc/grpc-js").is_dir() && dir.join("@grpc/proto-loader").is_dir() {
        return Some(dir);
    }
    let message = format!(
        "node or @grpc/grpc-js is missing ({}); run scripts/test.sh, which installs them",
        dir.display()
    );
    common::peer_missing(&message);
    None
}

#[test]
fn grpc_js_fetches_validates_and_is_refused_without_the_header_whatever_authority_it_sends() {
    let Some(modules) = node_modules() else { return };
    let daemon = common::quickstart("");
    let out = Command::new("node")
        .arg(common::root().join("tests/peers/node/spiffe_peer.js"))
        .arg(common::root().join("proto"))
        .arg(&daemon.socket)
        .arg("demo")
        .env("NODE_PATH", &modules)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let expected = format!("spiffe://quickstart.tbot.local/user/{uid}");
    let forms = result.as_object().unwrap();
    assert_eq!(forms.len(), 4, "{result:#}");
    for (form, calls) in forms {
        for call in ["FetchX509SVID", "FetchJWTSVID", "ValidateJWTSVID"] {
            assert_eq!(calls[call]["ok"], true, "{call} with :authority {form}: {result:#}");
            assert_eq!(
                calls[call]["spiffe_id"],
                expected.as_str(),
                "{call} with :authority {form}"
            );
        }
        assert_eq!(calls["no header"]["code"], "INVALID_ARGUMENT", ":authority {form}");
    }
}
