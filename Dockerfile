# callvault image: build with the Rust toolchain, run on a slim Debian.
#   docker build -t callvault .
#   docker run --rm -p 5060:5060/udp -p 5060:5060/tcp -p 8080:8080 -p 20000-20199:20000-20199/udp \
#     -e CALLVAULT_SIP_PUBLIC_ADDRESS=<host address> callvault
# The default command serves config/examples/docker.toml (all interfaces, data in the
# /var/lib/callvault volume); override keys with -e CALLVAULT_<SECTION>_<KEY>=..., e.g.
# CALLVAULT_SIP_PUBLIC_ADDRESS, or mount another file and pass --config.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin callvault

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/callvault --create-home callvault
COPY --from=build /src/target/release/callvault /usr/local/bin/callvault
COPY config /etc/callvault
USER callvault
WORKDIR /var/lib/callvault
EXPOSE 5060/udp 5060/tcp 8080/tcp 20000-20199/udp
VOLUME ["/var/lib/callvault"]
ENTRYPOINT ["callvault"]
CMD ["serve", "--config", "/etc/callvault/examples/docker.toml"]
