//! Compiles the protos in `proto/` with protox (pure Rust: no `protoc` on the machine) and generates
//! the tonic code: servers and clients of tbot's own APIs (`workload.proto`, `admin.proto`,
//! `issuer.proto`, `sds.proto`), and a client of etcd's (`etcd.proto`, the part the etcd store uses).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    commit();
    let ours = protox::compile(
        ["workload.proto", "admin.proto", "issuer.proto", "sds.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Smaller per-call buffers than tonic's default (see src/workload_api/codec.rs).
        .codec_path("crate::workload_api::codec::LeanCodec")
        .compile_fds(ours)?;
    let etcd = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .codec_path("crate::workload_api::codec::LeanCodec")
        .compile_fds(etcd)?;
    Ok(())
}

/// `TBOT_GIT_COMMIT` for `--version`: the commit of the checkout being built, else the
/// `TBOT_GIT_COMMIT` of the environment (a build from a release tarball), else `unknown`. Only a
/// new commit or branch reruns this (not every `git add`, which would rebuild the crate each time),
/// so it does not say whether the work tree had changes.
fn commit() {
    println!("cargo:rerun-if-env-changed=TBOT_GIT_COMMIT");
    for watched in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(watched).exists() {
            println!("cargo:rerun-if-changed={watched}");
        }
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|c| !c.is_empty())
        .or_else(|| std::env::var("TBOT_GIT_COMMIT").ok())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TBOT_GIT_COMMIT={commit}");
}
