# Stand-in for redis:7-bookworm from Debian's redis-server: data in /data (the working folder),
# run as the redis user, protected mode off by default as the official image builds it (so the
# other containers of the compose network may connect).
ARG DEBIAN_IMAGE=ncp-e2e/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
