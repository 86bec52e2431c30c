# bedside-server in a container: Debian 12 slim, an unprivileged user, the store in a volume.
# NOT BUILT HERE: the development machine has no container engine. docs/deploying.md says how
# to run it; `cargo xtask package` builds the Debian package that is tested in CI.
#
#   docker build -t bedside-server .
#   docker run -p 8443:8443 -v bedside-data:/var/lib/bedside bedside-server

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p bedside-server \
 && install -D -m 0755 target/release/bedside-server /out/bedside-server

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/bedside \
        --shell /usr/sbin/nologin bedside \
 && install -d -o bedside -g bedside -m 0700 /var/lib/bedside \
 && install -d -m 0755 /etc/bedside
COPY --from=build /out/bedside-server /usr/bin/bedside-server
# The default for a container: every address, plain HTTP for a TLS-terminating proxy or
# orchestrator ingress in front, no relay (mount your own /etc/bedside/bedside.toml with
# [turn] and turn.relay.relay-ips to run it here, and publish its ports). Secrets: the
# BEDSIDE_ADMIN_API_KEY / BEDSIDE_TOKEN_SECRET / BEDSIDE_TURN_SECRET environment or the
# *-file settings, rather than generated into the volume.
RUN printf '%s\n' \
      'listen = "0.0.0.0:8443"' \
      'data-dir = "/var/lib/bedside"' \
      'log-format = "json"' \
      '[tls]' 'mode = "off"' \
      '[turn]' 'enabled = false' > /etc/bedside/bedside.toml
USER bedside
VOLUME /var/lib/bedside
EXPOSE 8443/tcp 3478/udp 3478/tcp
# Probe http://HOST:8443/readyz (readiness) and /healthz (liveness) from the orchestrator.
ENTRYPOINT ["/usr/bin/bedside-server", "--config", "/etc/bedside/bedside.toml"]
