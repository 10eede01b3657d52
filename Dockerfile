# peerd container image.
#
#   podman build --format docker -t peerd .       # or: docker build -t peerd .
#   podman run -d --name n1 --init -e PEERD_API_TOKEN=T -v n1-data:/var/lib/peerd \
#       -v ./gossip.key:/etc/peerd/gossip.key:ro peerd --name n1 \
#       --advertise 10.89.0.11:7946 --seeds 10.89.0.11:7946,10.89.0.12:7946
#
# (--format docker: the OCI image format has no HEALTHCHECK; podman drops it.)
#
# BASE_IMAGE: any image with python3 >= 3.11, its venv module and useradd
# (the default is the official slim Python image). Where no registry can be
# reached, make a base from Debian's packages with
# deploy/container/make-base-image.sh and pass
# --build-arg BASE_IMAGE=localhost/peerd-base:bookworm.
# PIP_INSTALL_ARGS: extra pip arguments, e.g. an offline wheelhouse made on
# the host with `pip wheel . setuptools wheel -w wheelhouse`: either in the
# build context ("--no-index --find-links=/src/wheelhouse") or, with podman,
# mounted for the build only (`podman build -v "$PWD/wheelhouse:/wheelhouse:ro"
# --build-arg PIP_INSTALL_ARGS="--no-index --find-links=/wheelhouse"`).
ARG BASE_IMAGE=python:3.12-slim

# --- build stage: a venv with peerd and its dependencies ----------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_INSTALL_ARGS=""
COPY . /src
RUN python3 -m venv /opt/peerd \
 && /opt/peerd/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_INSTALL_ARGS} /src \
 && install -m 0755 /src/deploy/container/healthcheck.py /opt/peerd/bin/peerd-healthcheck \
 && /opt/peerd/bin/peerd --help >/dev/null

# --- the image: the venv, a system user, nothing of the build ------------------
FROM ${BASE_IMAGE}
COPY --from=build /opt/peerd /opt/peerd
RUN (getent group peerd >/dev/null || groupadd --gid 10001 peerd) \
 && useradd --uid 10001 --gid peerd --home-dir /var/lib/peerd --no-create-home \
        --shell /usr/sbin/nologin peerd \
 && mkdir -p /var/lib/peerd /etc/peerd \
 && chown peerd:peerd /var/lib/peerd \
 && chmod 0700 /var/lib/peerd

# Gossip on 7946 (UDP and TCP, memberlist's port), API and /metrics on 7701,
# bound on every interface of the container. Each PEERD_* is a flag's
# default; flags given to `podman run ... peerd-image --flag` win.
# A node must advertise an address its peers reach (the container's IP):
# --advertise / PEERD_ADVERTISE (Kubernetes: the pod IP, see deploy/kubernetes).
ENV PATH=/opt/peerd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PEERD_BIND=0.0.0.0:7946 \
    PEERD_API=0.0.0.0:7701 \
    PEERD_DATA_DIR=/var/lib/peerd \
    PEERD_KEY_FILE=/etc/peerd/gossip.key \
    PEERD_LOG_FORMAT=json
EXPOSE 7946/udp 7946/tcp 7701/tcp
VOLUME ["/var/lib/peerd"]
USER peerd:peerd
WORKDIR /var/lib/peerd
# GET /v1/status with the API token (PEERD_API_TOKEN or PEERD_API_TOKEN_FILE)
# must answer 200; https when PEERD_API_TLS_CERT is set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["peerd-healthcheck"]
# SIGTERM: leave the cluster, let running runs finish within
# shutdown_grace_s (30 s), flush state, exit 0. Give `podman stop` more:
# podman stop -t 45 (or podman run --stop-timeout 45).
STOPSIGNAL SIGTERM
ENTRYPOINT ["peerd"]
