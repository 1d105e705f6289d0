# hotplug-agent container image: the DaemonSet's (deploy/kubernetes).
#
#   docker build -t hotplug-agent:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# REVISION (the build context has no .git) becomes `hotplug_agent_build_info{revision}` and
# the image's org.opencontainers.image.revision label.
#
# Two stages: the builder has the whole toolchain (the same recipe as `cargo xtask setup`,
# xtask/src/setup.rs); the runtime image has the binary and libudev, nothing else.

FROM rust:1.95-bookworm AS builder

# The udev crate finds libudev through pkg-config.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libudev-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*

# agent/build.rs builds the eBPF crate with -Z build-std=core (core's sources: rust-src)
# and links it with bpf-linker 0.10.2, which loads rustc's own LLVM.
RUN rustup component add rust-src \
    && cargo install bpf-linker@0.10.2 --locked

# agent/build.rs asks aya-build for the toolchain `stable` through `rustup run stable`; here
# the toolchain is named 1.95.0, and rustup cannot alias it. With rustup off PATH, aya-build
# uses the cargo and rustc it finds on PATH instead: this toolchain's own binaries (whose
# ../lib also holds the libLLVM that bpf-linker loads).
RUN ln -s "$(rustc --print sysroot)" /opt/rust-toolchain \
    && cp /usr/local/cargo/bin/bpf-linker /usr/local/bin/bpf-linker
ENV PATH=/opt/rust-toolchain/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

WORKDIR /src
COPY . .
ARG REVISION=unknown
# The release profile keeps line tables (debug = 1); the image drops them (symbols stay, so
# backtraces still name functions). The eBPF object is embedded as data, not touched.
RUN HOTPLUG_AGENT_REVISION="$REVISION" cargo build --release --locked -p hotplug-agent \
    && strip --strip-debug -o /hotplug-agent target/release/hotplug-agent

FROM debian:bookworm-slim

# libudev1: the uevent monitor (libudev's kernel monitor); ca-certificates: API servers
# reached through a kubeconfig with a public CA.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libudev1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /hotplug-agent /usr/local/bin/hotplug-agent

ARG REVISION=unknown
ARG VERSION=0.1.0
# Where the sources are published (the repository URL): --build-arg SOURCE=https://...
ARG SOURCE=
LABEL org.opencontainers.image.title="hotplug-agent" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.description="Makes the kubelet see hot-plugged CPUs and memory" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# Root, on purpose: the DaemonSet runs it as uid 0 of the host's user namespace with a few
# capabilities (deploy/kubernetes/base/daemonset.yaml); an image USER would only be overridden.
ENTRYPOINT ["/usr/local/bin/hotplug-agent"]
CMD ["run"]
