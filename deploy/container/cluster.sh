#!/bin/sh
# Run an N-node peerd cluster in containers on one host, with podman or docker.
#
#   TOKEN=s3cret deploy/container/cluster.sh up     # network, key, volumes, N containers
#   deploy/container/cluster.sh down                # graceful stop (SIGTERM), remove containers
#   deploy/container/cluster.sh purge               # down, then remove the network and volumes
#   deploy/container/cluster.sh ips                 # the members' addresses
#
# Environment (defaults in brackets):
#   IMAGE        the peerd image [localhost/peerd:latest]
#   ENGINE       podman or docker, with any global options [podman]
#                (e.g. ENGINE="podman --storage-driver vfs")
#   RUN_OPTS     extra `run` options for every container (e.g. --ulimit ...)
#   PREFIX       names: PREFIX-1.. containers, PREFIX-1-data.. volumes,
#                PREFIX-net network [peerd]
#   N            members [3]
#   SUBNET       the network's /24; member i gets .(10+i) [10.89.70.0/24]
#   TOKEN        API bearer token (or TOKEN_FILE: a file whose first line is it)
#   KEY_FILE     gossip key, shared by all members [./gossip.key]; made with
#                the image's `peerd keygen` if missing
#   TLS_DIR      serve the APIs over https: a directory with ca.pem and, for
#                member i, n<i>.pem and n<i>-key.pem (the certificate's names
#                must include the member's address and 127.0.0.1); mounted
#                at /etc/peerd/tls, with PEERCTL_NODE and PEERCTL_CA_CERT set
#                for peerctl inside the containers
#   PUBLISH      first host port to publish the APIs on 127.0.0.1 (member i
#                on PUBLISH+i-1); empty = not published
#   STOP_TIMEOUT seconds `stop` waits before SIGKILL [45] (peerd lets runs
#                finish for shutdown_grace_s, 30 s by default, then leaves)
#   Further arguments after `up` go to every peerd (e.g. --profile local).
set -eu
cmd=${1:-}
[ $# -gt 0 ] && shift
IMAGE=${IMAGE:-localhost/peerd:latest}
ENGINE=${ENGINE:-podman}
RUN_OPTS=${RUN_OPTS:-}
PREFIX=${PREFIX:-peerd}
N=${N:-3}
SUBNET=${SUBNET:-10.89.70.0/24}
KEY_FILE=${KEY_FILE:-./gossip.key}
PUBLISH=${PUBLISH:-}
STOP_TIMEOUT=${STOP_TIMEOUT:-45}
NET=$PREFIX-net
BASE=${SUBNET%.*/*}   # 10.89.70

ip_of() { echo "$BASE.$((10 + $1))"; }

# the image's peerd user (uid 10001) reads a secret file; nobody else should
own() {
    if [ "$(id -u)" = 0 ]; then
        chown 10001:10001 "$1" && chmod 600 "$1"
    elif [ "${ENGINE%% *}" = podman ]; then
        podman unshare chown 10001:10001 "$1" && chmod 600 "$1"
    else
        chmod 644 "$1"; echo "$0: $1 made readable by others for the container user" >&2
    fi
}

# shellcheck disable=SC2086
e() { $ENGINE "$@"; }

up() {
    if [ -z "${TOKEN:-}" ] && [ -z "${TOKEN_FILE:-}" ]; then
        echo "$0: set TOKEN or TOKEN_FILE (the API bearer token)" >&2; exit 2
    fi
    e network exists "$NET" 2>/dev/null || e network inspect "$NET" >/dev/null 2>&1 \
        || e network create --subnet "$SUBNET" "$NET" >/dev/null
    if [ ! -s "$KEY_FILE" ]; then
        (umask 077; e run --rm $RUN_OPTS "$IMAGE" keygen > "$KEY_FILE")
    fi
    own "$KEY_FILE"
    tls=""
    if [ -n "${TLS_DIR:-}" ]; then
        tls=$(cd "$TLS_DIR" && pwd)
        i=1
        while [ "$i" -le "$N" ]; do own "$tls/n$i-key.pem"; i=$((i + 1)); done
    fi
    key=$(cd "$(dirname "$KEY_FILE")" && pwd)/$(basename "$KEY_FILE")
    token_opts="-e PEERD_API_TOKEN=${TOKEN:-}"
    if [ -n "${TOKEN_FILE:-}" ]; then
        tf=$(cd "$(dirname "$TOKEN_FILE")" && pwd)/$(basename "$TOKEN_FILE")
        token_opts="-v $tf:/etc/peerd/api-token:ro -e PEERD_API_TOKEN_FILE=/etc/peerd/api-token"
    fi
    seeds="$(ip_of 1):7946,$(ip_of 2):7946"
    i=1
    while [ "$i" -le "$N" ]; do
        name=$PREFIX-$i
        pub=""
        [ -n "$PUBLISH" ] && pub="-p 127.0.0.1:$((PUBLISH + i - 1)):7701"
        tls_opts=""
        [ -n "$tls" ] && tls_opts="-v $tls:/etc/peerd/tls:ro -e PEERD_API_TLS_CERT=/etc/peerd/tls/n$i.pem
            -e PEERD_API_TLS_KEY=/etc/peerd/tls/n$i-key.pem -e PEERCTL_NODE=https://127.0.0.1:7701
            -e PEERCTL_CA_CERT=/etc/peerd/tls/ca.pem"
        # shellcheck disable=SC2086
        e run -d $RUN_OPTS --init --name "$name" --hostname "$name" --network "$NET" --ip "$(ip_of "$i")" \
            $token_opts $tls_opts $pub -v "$key:/etc/peerd/gossip.key:ro" -v "$name-data:/var/lib/peerd" \
            --stop-timeout "$STOP_TIMEOUT" \
            "$IMAGE" --name "n$i" --advertise "$(ip_of "$i"):7946" --seeds "$seeds" "$@" >/dev/null
        echo "$name: n$i at $(ip_of "$i") (gossip 7946, API 7701${tls:+ https}${pub:+, on the host 127.0.0.1:$((PUBLISH + i - 1))})"
        i=$((i + 1))
    done
}

down() {
    i=1
    while [ "$i" -le "$N" ]; do
        e stop -t "$STOP_TIMEOUT" "$PREFIX-$i" >/dev/null 2>&1 || true
        e rm -f "$PREFIX-$i" >/dev/null 2>&1 || true
        i=$((i + 1))
    done
}

purge() {
    down
    e network rm -f "$NET" >/dev/null 2>&1 || true
    i=1
    while [ "$i" -le "$N" ]; do
        e volume rm -f "$PREFIX-$i-data" >/dev/null 2>&1 || true
        i=$((i + 1))
    done
}

case "$cmd" in
    up) up "$@" ;;
    down) down ;;
    purge) purge ;;
    ips) i=1; while [ "$i" -le "$N" ]; do echo "$PREFIX-$i n$i $(ip_of "$i")"; i=$((i + 1)); done ;;
    *) sed -n '2,30p' "$0" >&2; exit 2 ;;
esac
