# syntax=docker/dockerfile:1
#
# grpcgate container image.
#   docker build -t grpcgate .
#   docker build --build-arg PGO=1 -t grpcgate .     # profile-guided build (benches/load/pgo.sh)
#   docker run --rm -p 8443:8443 -p 8080:8080 -p 9901:9901 \
#     -v "$PWD/my.toml:/etc/grpcgate/grpcgate.toml:ro" grpcgate
# The image ships config/example.toml as /etc/grpcgate/grpcgate.toml; mount your own file over it.
# Relative TLS paths in the config resolve against /etc/grpcgate, so mount certificates there too.
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
#
# Stages:
#   build       rust:1-bookworm: the grpcgate binary (plain or PGO) and grpcgate-healthcheck
#   runtime-base  distroless cc (glibc, libgcc, CA certificates; no shell, no package manager):
#               the user, config, ports, HEALTHCHECK and entrypoint shared by the two stages below
#   prebuilt    runtime-base + binaries built outside (dist/grpcgate, dist/grpcgate-healthcheck in the
#               build context); deploy/test-image.sh builds this target, with RUNTIME_IMAGE set to a
#               base it makes with debootstrap, on machines that cannot pull images
#   runtime     (the default, last stage) runtime-base + the binaries of the build stage
#
# Both base images can be overridden, e.g. to pin digests (recommended for production) or use a mirror:
#   --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12@sha256:...
# Both are Debian 12 (bookworm), so the binary's glibc matches the runtime's.
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:latest

# ---- build ----------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# protoc is vendored by build.rs (protoc-bin-vendored); jemalloc, ring and aws-lc-sys (the TLS
# listeners' crypto, built from C with cc: no cmake, Go or clang on x86_64/aarch64 Linux) need make and
# cc, which the rust image has: no apt packages are needed.
COPY . .
# The registry, git checkouts and target/ live in BuildKit cache mounts, so a rebuild after a source
# change reuses the compiled dependencies. The binaries are copied out of the cache in the same step.
# --build-arg PGO=1 builds with profile-guided optimisation (benches/load/pgo.sh: an instrumented build,
# a short load run on loopback, the optimised build): 15-20 % less CPU per proxied call in our
# benchmark, for about three builds' worth of build time.
# The release profile keeps line tables (debug = 1, for profiling): 50 MB. The image gets the binary without
# them (13.6 MB with aws-lc-rs, of which aws-lc ~1.7 MB; symbols stay, so backtraces still name functions);
# --build-arg DEBUG_INFO=1 keeps them.
ARG PGO=0
ARG DEBUG_INFO=0
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then \
        bin=$(bash benches/load/pgo.sh); \
    else \
        cargo build --release --locked && bin=target/release/grpcgate; \
    fi \
    && mkdir -p /out \
    && if [ "$DEBUG_INFO" = 1 ]; then cp "$bin" /out/grpcgate; else objcopy --strip-debug "$bin" /out/grpcgate; fi \
    && rustc --edition 2021 -C opt-level=s -C strip=symbols -C panic=abort \
        deploy/healthcheck/main.rs -o /out/grpcgate-healthcheck

# ---- runtime-base ---------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime-base
COPY config/example.toml /etc/grpcgate/grpcgate.toml
# Any non-root uid works (the binary needs no /etc/passwd entry); Kubernetes manifests in deploy/ use the
# same one. The process writes nothing to disk, so a read-only root filesystem is fine.
USER 10001:10001

# Listeners "edge" and "internal" and the admin server of config/example.toml (all on 0.0.0.0).
EXPOSE 8443 8080 9901

# Log level (tracing EnvFilter syntax), e.g. "debug" or "grpcgate=debug".
ENV RUST_LOG=info,rustls=error
# Only the HEALTHCHECK reads these: the admin port of your config if it is not 9901, and the path.
ENV HEALTHCHECK_ADMIN_PORT=9901 HEALTHCHECK_PATH=/healthz

# GET /healthz on the admin port by a 370 KB std-only helper (deploy/healthcheck/main.rs), since the
# image has no shell and no curl: exit 0 on a 200 status line. Needs [admin] in the config.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/grpcgate-healthcheck"]

# SIGTERM (docker stop) starts a graceful drain of up to drain_timeout (default 30s); give `docker stop -t`
# / terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/grpcgate"]
CMD ["--config", "/etc/grpcgate/grpcgate.toml"]

# ---- prebuilt (deploy/test-image.sh) --------------------------------------------------------------
FROM runtime-base AS prebuilt
COPY dist/grpcgate dist/grpcgate-healthcheck /usr/local/bin/

# ---- runtime (default) ----------------------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /out/grpcgate /out/grpcgate-healthcheck /usr/local/bin/
