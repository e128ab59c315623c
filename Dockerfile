# dockerlb as a sidecar: `docker build -t dockerlb .`
# Runs with CAP_NET_ADMIN only (NAT); never --privileged. See compose/.
#
# BASE: any Debian-family image with python3 (>= 3.11) and its venv module.
# Offline builds put wheels of dockerlb and its dependencies in dist/
# (`pip wheel -w dist .`); otherwise the build stage installs from PyPI.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN python3 -m venv /opt/dockerlb
# dist* matches nothing without wheels; pyproject.toml keeps the COPY valid.
COPY pyproject.toml README.md dist* /src/
COPY dockerlb /src/dockerlb
RUN if ls /src/*.whl > /dev/null 2>&1; then \
        /opt/dockerlb/bin/pip install --no-cache-dir --no-index --find-links /src dockerlb; \
    else \
        /opt/dockerlb/bin/pip install --no-cache-dir /src; \
    fi \
    && find /opt/dockerlb -name __pycache__ -prune -exec rm -rf {} + \
    && rm -rf /opt/dockerlb/lib/python3*/site-packages/pip

FROM ${BASE}
# nft for the masquerade rule, mount (util-linux) for a procfs of the
# controller's own (sysctls, see dockerlb/adapters/sysctl.py); skipped when the base
# already has them, as the offline test base does.
RUN if ! command -v nft > /dev/null || ! command -v mount > /dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends nftables util-linux \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/dockerlb /opt/dockerlb
# Metrics and readiness on 127.0.0.1:9469, the loopback of the director's
# namespace: the endpoint has no auth, so not every address (VIPs included).
# To scrape from elsewhere, set DOCKERLB_METRICS_LISTEN to a private address.
ENV PATH=/opt/dockerlb/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    DOCKERLB_METRICS_LISTEN=127.0.0.1:9469
# Healthy once the start-up sync is done and full resyncs keep completing:
# it asks /healthz where DOCKERLB_METRICS_LISTEN says at the time of the check
# (a listener on every address is asked on loopback); the standard library
# alone, not the whole CLI (`dockerlb healthz` does the same for people).
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python3", "-m", "dockerlb.adapters.healthz"]
ENTRYPOINT ["dockerlb"]
CMD ["run"]
