# pyegress container images (deploy/README.md says how they are used).
#
#   docker build -t pyegress .                   # runtime: sidecar and DMZ (the default target)
#   docker build --target init -t pyegress-init .  # case B init container: + nftables, iptables
#
# The build stage installs the project into a virtual environment at /opt/pyegress; the
# runtime stages copy only that environment (no compiler, no build tools, no pip).
# tests/test_dockerfile.py replays the build stage's COPY and RUN steps in a temporary
# directory and runs `pyegress -V` from the result, so keep those steps plain shell.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/pyegress \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyegress ./pyegress
RUN python -m venv "$VIRTUAL_ENV" \
 && "$VIRTUAL_ENV/bin/python" -m pip install --no-cache-dir . \
 && "$VIRTUAL_ENV/bin/python" -m pip uninstall --yes pip setuptools

# Case B's init container: `pyegress redirect install` applies the rules with nft
# (iptables-restore where nft is absent). It runs as root with NET_ADMIN and no other
# capability (deploy/overlays/case-b), exits, and never carries traffic.
FROM ${PYTHON_IMAGE} AS init
ARG VERSION=dev
LABEL org.opencontainers.image.title="pyegress-init" \
      org.opencontainers.image.description="pyegress with nftables and iptables, for the transparent-mode init container" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
RUN apt-get update \
 && apt-get install --yes --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/pyegress /opt/pyegress
ENV PATH=/opt/pyegress/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 0
ENTRYPOINT ["/opt/pyegress/bin/pyegress"]
CMD ["-V"]

# The runtime image (last stage: what `docker build .` produces).
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pyegress" \
      org.opencontainers.image.description="gost-compatible egress proxy: sidecar, mutual-TLS h2 tier link, audited DMZ exit" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.documentation="README.md, docs/ and deploy/README.md in the source tree"
COPY --from=build /opt/pyegress /opt/pyegress
RUN groupadd --gid 10001 pyegress \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pyegress
ENV PATH=/opt/pyegress/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYEGRESS_HEALTHCHECK_URL=http://127.0.0.1:9000/readyz
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 18080: the sidecar's HTTP proxy; 8443: the DMZ's h2 listener; 9000: -metrics (admin).
EXPOSE 18080 8443 9000
# Needs the admin listener (-metrics :9000, as in CMD); override the URL with
# PYEGRESS_HEALTHCHECK_URL when it listens elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/pyegress/bin/pyegress", "healthcheck"]
ENTRYPOINT ["/opt/pyegress/bin/pyegress"]
CMD ["-L", "http://:18080", "-metrics", ":9000"]
