//! Compiles `proto/workload.proto`, `proto/admin.proto`, `proto/issuer.proto` and `proto/sds.proto` with protox (pure Rust: no `protoc` on the machine) and generates
//! the tonic server and client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["workload.proto", "admin.proto", "issuer.proto", "sds.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Smaller per-call buffers than tonic's default (see src/workload_api/codec.rs).
        .codec_path("crate::workload_api::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
