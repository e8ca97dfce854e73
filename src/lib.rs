//! grpcgate: a gRPC-aware L7 load-balancing reverse proxy.
//!
//! One request's path through the code: [`listener`] accepts a connection (TLS or h2c) and an HTTP/2
//! stream, [`proxy::serve_stream`] asks the [`router`] for a route, the cluster's [`balancer`] for an
//! endpoint and that endpoint's [`upstream`] pool for an h2c connection, then pumps frames both ways
//! with HTTP/2 flow control until the trailers. [`grpc`] holds the protocol facts, [`metrics`] the
//! Prometheus handles, [`access_log`] the per-call log and [`admin`] the operator endpoints.
//! [`Gateway`] wires it all together. [`config`] turns config text into a [`Config`] without
//! touching a file; [`load`] reads the files.
//!
//! The `demo` feature (on by default) adds `demo` and `echo`: the `grpcgate demo` command and the
//! echo backend it, the tests and the load benchmarks run. The proxy does not need them.

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
#[cfg(feature = "demo")]
pub mod echo;
pub mod gateway;
pub mod grpc;
pub mod health;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use config::Config;
pub use gateway::Gateway;

/// Generated protobuf and gRPC code for `proto/`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    /// The echo test service (`echo.Echo`).
    #[cfg(feature = "demo")]
    pub mod echo {
        tonic::include_proto!("echo");
    }
    /// Backend load reports (ORCA, `xds.data.orca.v3.OrcaLoadReport`).
    pub mod orca {
        tonic::include_proto!("xds.data.orca.v3");
    }
    /// The standard health-checking protocol (`grpc.health.v1.Health`).
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}
