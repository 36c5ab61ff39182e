//! Compiles the JobManager <-> TaskManager protobufs with the pure-Rust
//! `protox` compiler (no `protoc` needed on the build machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ferry/v1/taskmanager.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
