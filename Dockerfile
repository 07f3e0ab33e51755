# syntax=docker/dockerfile:1
# trstream: build with the pinned toolchain, run on a slim Debian as an unprivileged user.

FROM rust:1.95-slim-bookworm AS build
# librdkafka is built from source by rdkafka-sys: make, perl, a C/C++ compiler, zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make perl pkg-config g++ zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds, so a source change rebuilds only trstream.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin trstream \
 && cp target/release/trstream /usr/local/bin/trstream

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home trstream
COPY --from=build /usr/local/bin/trstream /usr/local/bin/trstream
USER 10001
# /metrics, /healthz and /readyz (http.listen).
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["trstream", "healthcheck"]
ENTRYPOINT ["trstream"]
CMD ["run"]
