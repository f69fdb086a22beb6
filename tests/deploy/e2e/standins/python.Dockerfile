# Stand-in for python:3.12-slim-bookworm, built offline from Debian's own packages (no image
# registry is reachable where the e2e test runs): `python` and `pip` on PATH as in the official
# image, from a venv over Debian's python3 (3.11), so `pip install` works as root without PEP 668.
# host-ca.crt is the build host's CA bundle (scripts/e2e_compose.sh copies it into the context):
# where HTTPS to the package index passes a TLS-inspecting proxy, pip must trust what the host does.
ARG DEBIAN_IMAGE=ncp-e2e/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8 PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates netbase \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python \
    && python --version && pip --version
COPY host-ca.crt /etc/ssl/certs/host-ca.crt
CMD ["python3"]
