//! Compiles `proto/` with protox, a protobuf compiler in Rust that carries the well-known
//! types, so building needs no `protoc` and no system protobuf headers.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=kubevirt");

    let hypervisor = protox::compile(["kubevirt/hypervisor/v1/hypervisor.proto"], ["."])?;
    // Served by the aggregator's reflection service, so grpcurl needs no .proto files.
    fs::write(
        out.join("hypervisor_descriptor.bin"),
        hypervisor.encode_to_vec(),
    )?;
    generator()
        // The aggregator holds a call's buffers for every open report stream.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(hypervisor)?;

    let hooks = protox::compile(
        [
            "kubevirt/hooks/info/api_info.proto",
            "kubevirt/hooks/v1alpha1/api_v1alpha1.proto",
            "kubevirt/hooks/v1alpha2/api_v1alpha2.proto",
            "kubevirt/hooks/v1alpha3/api_v1alpha3.proto",
        ],
        ["."],
    )?;
    generator()
        // The domain XML goes back exactly as it came, without a copy.
        .bytes(".kubevirt.hooks")
        .compile_fds(hooks)?;
    Ok(())
}

/// The code generator as `compile_protos` configures it: generated types are exempt from
/// clippy, as they were when protoc compiled them.
fn generator() -> tonic_prost_build::Builder {
    tonic_prost_build::configure().type_attribute(".", "#[allow(clippy::all)]")
}
