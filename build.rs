//! Compiles `proto/` with protox (pure Rust, so building needs no system
//! `protoc`), generates the tonic client and server, and writes the encoded
//! descriptor set that server reflection serves.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/customermapping/v1/customer_mapping.proto",
    // Served by reflection so that grpcurl can decode our error details.
    "proto/google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build does not print this for `compile_fds`.
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("customer_mapping_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::grpc::codec::ProstCodec")
        .compile_fds(fds)?;
    Ok(())
}
