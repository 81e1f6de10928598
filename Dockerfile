# syntax=docker/dockerfile:1
# customer-mapping server image: `docker build -t customer-mapping .`
# (BuildKit; the cache mounts keep the crates and target/ between builds).
# Not built in CI: the CI machines have no Docker engine.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything the build needs (Cargo manifests, build.rs, proto/, src/,
# migration/); .dockerignore keeps target/, .git, the venv and databases out.
COPY . .
# The protos are compiled by protox (pure Rust): no protoc to install.
# target/ is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin customer-mapping \
 && install -D -m 0755 target/release/customer-mapping /out/customer-mapping

# glibc (Debian 12, as the builder) and libgcc; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/customer-mapping /usr/local/bin/customer-mapping
# nonroot is 65532; numeric so that Kubernetes can verify runAsNonRoot.
USER 65532:65532
# Writable by 65532: the SQLite default (no DATABASE_URL) lands here. In
# Kubernetes DATABASE_URL comes from a Secret and the root is read-only.
WORKDIR /home/nonroot
# The built-in default is 127.0.0.1:50051, unreachable from outside a container.
ENV LISTEN_ADDR=0.0.0.0:50051 \
    METRICS_ADDR=0.0.0.0:9090
# gRPC (customermapping.v1, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9090
# The server is PID 1 and handles SIGTERM itself: NOT_SERVING, drain, exit 0.
ENTRYPOINT ["/usr/local/bin/customer-mapping"]
CMD ["serve"]
