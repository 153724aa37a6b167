//! Compiles `proto/` with protox (pure Rust: no system protoc needed), then
//! generates prost types, the tonic client and server, and pbjson serde
//! impls that follow protojson with the proto field names.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/cws/v1/events.proto", "proto/cws/v1/service.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    let descriptor_set = prost::Message::encode_to_vec(&descriptors);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("cws_descriptor.bin"), &descriptor_set)?;

    let mut config = prost_build::Config::new();
    config.compile_well_known_types().extern_path(".google.protobuf", "::pbjson_types");
    tonic_prost_build::configure().compile_fds_with_config(descriptors, config)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .preserve_proto_field_names()
        .build(&[".cws"])?;
    Ok(())
}
