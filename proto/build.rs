use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Served by the aggregator's reflection service, so grpcurl needs no .proto files.
        .file_descriptor_set_path(out.join("hypervisor_descriptor.bin"))
        // The aggregator holds a call's buffers for every open report stream.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_protos(&["kubevirt/hypervisor/v1/hypervisor.proto"], &["."])?;
    tonic_prost_build::configure()
        // The domain XML goes back exactly as it came, without a copy.
        .bytes(".kubevirt.hooks")
        .compile_protos(
            &[
                "kubevirt/hooks/info/api_info.proto",
                "kubevirt/hooks/v1alpha1/api_v1alpha1.proto",
                "kubevirt/hooks/v1alpha2/api_v1alpha2.proto",
                "kubevirt/hooks/v1alpha3/api_v1alpha3.proto",
            ],
            &["."],
        )?;
    Ok(())
}
