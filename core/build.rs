//! Compiles the JobManager <-> TaskManager and the TaskManager <->
//! TaskManager (exchange) protobufs with the pure-Rust `protox` compiler
//! (no `protoc` needed on the build machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ferry/v1/taskmanager.proto",
        "proto/ferry/v1/exchange.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // A batch's IPC bytes come out of the decode buffer as a
        // `bytes::Bytes` slice of it, not copied into a `Vec` first.
        .bytes(".ferry.v1.IpcBatch.ipc")
        // prost's codec, reserving each message's size before writing it.
        .codec_path("crate::codec::SizedCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
