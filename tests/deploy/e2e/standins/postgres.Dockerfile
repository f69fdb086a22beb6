# Stand-in for postgres:16-bookworm from Debian's postgresql-15: the same PGDATA, the same
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB first-start initialisation, listening on all
# addresses with password (scram) authentication, run as the postgres user. Subset only: no
# /docker-entrypoint-initdb.d scripts.
ARG DEBIAN_IMAGE=ncp-e2e/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# postgresql-common first, told not to create a cluster of its own (as the official image does).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-common \
    && sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres -m 3777 /var/run/postgresql \
    && install -d -o postgres -g postgres -m 700 "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
