# Multi-stage build: compile in the Rust image, run from a small Debian
# image as a non-root user. The healthcheck asks /healthz on the metrics
# address (batchd run); other commands (sim, submit) disable it in compose.
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin batchd \
 && cp target/release/batchd /usr/local/bin/batchd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home batchd
COPY --from=build /usr/local/bin/batchd /usr/local/bin/batchd
COPY config/batchd.toml /etc/batchd/defaults.toml
USER 10001
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["batchd"]
CMD ["run"]
