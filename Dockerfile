# syntax=docker/dockerfile:1
#
# serversync container image.
#
#   docker build -t serversync .
#   docker run --rm -p 127.0.0.1:9464:9464 \
#     -v /run/secrets/database-url:/run/secrets/database-url:ro \
#     -e SERVERSYNC__DATABASE__URL_FILE=/run/secrets/database-url \
#     -v /srv/recordings:/var/lib/serversync/recordings:ro \
#     serversync
#
# See docs/OPERATIONS.md ("Run in a container").

# ---- build -------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /app

# Dependency layer: build all crates from Cargo.lock against dummy sources, so that
# changing our own code does not rebuild the ~300 dependencies. This layer is reused as
# long as Cargo.toml and Cargo.lock do not change.
# (`cargo build` builds the library and the binary only: the `bench` example Cargo.toml
# declares is neither needed nor copied, here or below.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# Our sources. The SQL migrations are embedded into the binary at compile time
# (sqlx::migrate!), so they must be in the build context as well, with build.rs,
# which tells cargo to rebuild when they change.
COPY build.rs ./
COPY src ./src
COPY migrations ./migrations
# COPY keeps the files' mtimes, which can be older than the dummy build above; touch
# them so cargo rebuilds our crate instead of reusing the dummy one.
RUN find src migrations -type f -exec touch {} + \
 && cargo build --release --locked

# ---- runtime -----------------------------------------------------------------------
# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim

# CA roots for verifying the TLS certificates of the ingest API and PostgreSQL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user with a fixed uid/gid, so Kubernetes runAsNonRoot can verify it and
# file permissions on mounted volumes can be planned (uid/gid 10001).
RUN groupadd --system --gid 10001 serversync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin serversync \
 && mkdir -p /var/lib/serversync/recordings

COPY --from=builder /app/target/release/serversync /usr/local/bin/serversync
# A default configuration; mount your own over it (or override keys with
# SERVERSYNC__SECTION__KEY environment variables).
COPY config/serversync.example.toml /etc/serversync/serversync.toml

# The metrics/health listener defaults to 127.0.0.1:9464, which inside a container is
# reachable from nowhere but the container itself: Prometheus and the Kubernetes
# probes could not reach it. Listen on all interfaces of the container's own network
# namespace instead; publish the port on the host only where needed
# (e.g. -p 127.0.0.1:9464:9464).
ENV SERVERSYNC__METRICS__LISTEN=0.0.0.0:9464
EXPOSE 9464

# Secrets are never baked into the image: mount them as files (Docker/Kubernetes
# secrets, e.g. /run/secrets/database-url) and point the app at them with
#   SERVERSYNC__DATABASE__URL_FILE=/run/secrets/database-url
#   SERVERSYNC__INGEST__AUTH_TOKEN_FILE=/run/secrets/ingest-token
#   SERVERSYNC__INGEST__SIGNING_SECRET_FILE=/run/secrets/signing-secret

# No HEALTHCHECK: the image has no curl/wget, and adding one only for that grows the
# attack surface. Kubernetes probes GET /healthz (liveness) and /readyz (readiness) on
# port 9464 instead; see deploy/kubernetes/deployment.yaml.

USER 10001:10001

# SIGTERM (docker stop) = graceful shutdown within shutdown.grace (default 30s);
# use `docker stop -t 45` so Docker does not SIGKILL before that (its default is 10s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["serversync"]
CMD ["--config", "/etc/serversync/serversync.toml", "--log-format", "json", "run"]
