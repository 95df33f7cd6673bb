# syntax=docker/dockerfile:1
#
# breakwater container image.
#
#   docker build -t breakwater .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -v "$PWD/my-breakwater.yaml:/etc/breakwater/breakwater.yaml:ro" breakwater
#
# The image ships config/breakwater.yaml (the sidecar example) as the default config. Mount
# your own over /etc/breakwater/breakwater.yaml, or point BREAKWATER_CONFIG (or `run -c`)
# elsewhere. A changed file is reloaded without a restart.
#
# The admin listener (metrics, /healthz, /readyz) defaults to 127.0.0.1:9901. That address is
# unreachable from outside the container. For Prometheus in another pod, or for kubelet
# HTTP probes, set `admin.address: 0.0.0.0:9901` in the mounted config, and protect the
# port (it serves POST /reload and POST /circuit/...).

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, so they stay in a cached layer until Cargo.toml or Cargo.lock change:
# build them once against a placeholder crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources (the whole context minus .dockerignore, so files that the code embeds,
# like config/demo.yaml, are there too). Drop the placeholder crate's artifacts, so cargo
# cannot take them for up to date when the copied files have older timestamps.
COPY . .
RUN rm -rf target/release/.fingerprint/breakwater-* \
           target/release/deps/breakwater-* target/release/deps/libbreakwater-* \
           target/release/breakwater target/release/breakwater.d \
 && cargo build --release --locked \
 && ./target/release/breakwater --version

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 breakwater \
 && useradd --system --uid 10001 --gid breakwater --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin breakwater

COPY --from=builder /src/target/release/breakwater /usr/local/bin/breakwater
COPY config/breakwater.yaml /etc/breakwater/breakwater.yaml

ENV BREAKWATER_CONFIG=/etc/breakwater/breakwater.yaml
USER 10001:10001

# 8080: the example listener (`inbound`); 9901: admin (see the note at the top).
EXPOSE 8080 9901

# breakwater handles SIGTERM itself: /readyz turns 503, the drain starts, and it exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/breakwater"]
CMD ["run"]
