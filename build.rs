//! Generates the gRPC code for `proto/` with a vendored `protoc`, so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/echo.proto",
                "proto/health.proto",
                "proto/xds/data/orca/v3/orca_load_report.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
