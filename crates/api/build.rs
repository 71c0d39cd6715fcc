//! Compiles the protobuf API with protox (pure Rust), so no system `protoc`
//! is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/discovery.proto",
        "proto/ca.proto",
        "proto/zds.proto",
        "proto/waypoint.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
