# Container images of the saga orchestrator, the outbox relay and the example participant.
#
#   docker build --target orchestrator -t saga-orchestrator .
#   docker build --target relay        -t outbox-relay .
#   docker build --target participant  -t example-participant .
#
# The build stage runs the same scripts/install-deps and meson commands as CI (.ci/run ->
# scripts/test); tests/docker-check checks that every stage, target and copied path here
# exists. Runtime images carry only the shared libraries, run as a non-root user, answer
# HEALTHCHECK through the daemon's own `healthcheck` subcommand (GET /healthz on the admin
# address; no curl needed), and stop on SIGTERM (they finish the work in hand and exit 0).

FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps
COPY . .
RUN meson setup /build --buildtype=release -Dtests=disabled \
 && ninja -C /build \
 && meson install -C /build --destdir /out

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libpq5 librdkafka1 libcjson1 libev4 libuuid1 libmicrohttpd12 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin saga
USER 10001:10001
STOPSIGNAL SIGTERM

FROM runtime AS orchestrator
COPY --from=build /out/usr/local/bin/saga-orchestrator /usr/local/bin/saga-orchestrator
COPY --from=build /out/usr/local/bin/sagactl /usr/local/bin/sagactl
# Definitions are baked in at /etc/saga/sagas; mount a directory there (or point
# SAGA_DEFINITIONS_DIR elsewhere) to run your own.
COPY sagas/ /etc/saga/sagas/
ENV SAGA_DEFINITIONS_DIR=/etc/saga/sagas \
    SAGA_ADMIN_ADDR=0.0.0.0:9187
EXPOSE 9187
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/saga-orchestrator", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/saga-orchestrator"]

FROM runtime AS relay
COPY --from=build /out/usr/local/bin/outbox-relay /usr/local/bin/outbox-relay
ENV RELAY_ADMIN_ADDR=0.0.0.0:9188
EXPOSE 9188
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/outbox-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/outbox-relay"]

FROM runtime AS participant
COPY --from=build /out/usr/local/bin/example-participant /usr/local/bin/example-participant
COPY --from=build /out/usr/local/bin/sagactl /usr/local/bin/sagactl
ENTRYPOINT ["/usr/local/bin/example-participant"]
