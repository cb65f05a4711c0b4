# syntax=docker/dockerfile:1
# The usage-backfill image: one binary (controller, one-shot backfill, CRD
# printer) on distroless, non-root, no shell.
#
#   docker build -t usage-backfill:0.1.0 .
#
# .ci/chart-check keeps the cargo command below identical to one CI runs.

# The builder is pinned to the toolchain CI builds and tests with (the
# workspace's rust-version, which .ci/run checks).
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# glibc build: the musl target is not available where CI checks this
# command, so the runtime base is distroless/cc (glibc, libgcc_s).
# --no-default-features leaves out `demo` and the stand-in it links.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin usage-backfill \
 && cp target/release/usage-backfill /usr/local/bin/usage-backfill

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/usage-backfill /usage-backfill
USER 65532:65532
ENTRYPOINT ["/usage-backfill"]
CMD ["controller"]
