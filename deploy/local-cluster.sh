#!/usr/bin/env bash
# A Ray cluster and an MLflow tracking server on this machine, for trying `ray job submit`
# and `unlocked submit` before a real cluster:
#
#   bash deploy/local-cluster.sh up       # head (+ WORKERS worker nodes) and MLflow
#   source .unlocked/cluster/env.sh       # RAY_ADDRESS, the Ray token, MLflow's URI and login
#   bash deploy/local-cluster.sh status
#   bash deploy/local-cluster.sh down
#
# As a real deployment: Ray token authentication and MLflow basic authentication are on,
# with secrets generated into the state directory; every file this script or its servers
# write there (secrets, databases, logs) is readable by this user only. Every server
# listens on 127.0.0.1, except that with WORKERS > 0 Ray's multi-node mode binds its GCS
# and raylets on all interfaces (token-protected). An `up` that fails part-way stops what
# it started and removes the databases it had begun, so the next `up` starts clean.
# Settings (environment variables):
#   STATE_DIR      .unlocked/cluster   stores, logs, pids, secrets, checkpoints, datasets
#   WORKERS        0                   worker nodes besides the head
#   CPUS           number of cores     CPUs each node offers
#   GCS_PORT       6379                Ray's GCS port on the head
#   DASHBOARD_PORT 8265                Ray's dashboard and job API
#   MLFLOW_PORT    5000                the MLflow UI and REST API
set -euo pipefail
# Files created from here on, by this script and the servers it starts, are this user's
# alone: mlflow-auth.db holds password hashes, mlflow.db every run.
umask 077
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE_DIR=$(mkdir -p "${STATE_DIR:-.unlocked/cluster}" && cd "${STATE_DIR:-.unlocked/cluster}" && pwd)
WORKERS=${WORKERS:-0}
CPUS=${CPUS:-$(nproc)}
GCS_PORT=${GCS_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
BIN=$ROOT/.venv/bin

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

secret() {  # a secret kept across restarts, readable by this user only
    local file=$STATE_DIR/$1
    if [ ! -s "$file" ]; then
        (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(16))' > "$file")
    fi
    cat "$file"
}

start() {  # start NAME COMMAND...: in its own process group, so `down` stops exactly it
    local name=$1
    shift
    set -m
    "$@" > "$STATE_DIR/$name.log" 2>&1 &
    echo $! > "$STATE_DIR/$name.pid"
    set +m
}

running() {  # running NAME: stop `up` (which then rolls back) once NAME has exited
    local name=$1
    if ! kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null; then
        echo "error: $name exited while starting; its log, $STATE_DIR/$name.log, ends:" >&2
        tail -n 5 "$STATE_DIR/$name.log" >&2
        exit 1
    fi
}

wait_for() {  # wait_for NAME URL: until the URL answers (any HTTP status), at most 120 s
    local name=$1 url=$2
    for _ in $(seq 240); do
        running "$name"
        if "$BIN/python" - "$url" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
EOF
        sleep 0.5
    done
    echo "error: $name did not answer at $url in 120 s; see $STATE_DIR/$name.log" >&2
    exit 1
}

wait_for_nodes() {  # wait_for_nodes N: until N nodes are alive (a job may span them), 120 s
    local want=$1 nodes
    for _ in $(seq 120); do
        running head  # a head whose raylet failed after its dashboard came up
        nodes=$("$BIN/ray" status --address "127.0.0.1:$GCS_PORT" 2>/dev/null |
            grep -cE '^ *1 node_' || true)
        if [ "${nodes:-0}" -ge "$want" ]; then return 0; fi
        sleep 1
    done
    echo "error: fewer than $want Ray nodes joined in 120 s; see $STATE_DIR/worker-*.log" >&2
    exit 1
}

any_alive() {  # any_alive -PGID...: whether any of these process groups has a process left
    local group
    for group in "$@"; do
        if kill -0 -- "$group" 2>/dev/null; then return 0; fi
    done
    return 1
}

STORES=(mlflow.db mlflow-auth.db)
NEW_STORES=()  # the stores this `up` creates: a failed `up` removes them, half-made

rollback() {  # after a failed `up`: stop everything it started, drop the stores it began
    echo "error: up failed; stopping what it started (logs stay in $STATE_DIR)" >&2
    down > /dev/null
    if [ "${#NEW_STORES[@]}" -gt 0 ]; then rm -f "${NEW_STORES[@]}"; fi
}

up() {
    if [ ! -x "$BIN/python" ]; then
        bash scripts/setup.sh
    fi
    if [ -e "$STATE_DIR/head.pid" ]; then
        echo "error: a cluster from $STATE_DIR is up already; run '$0 down' first" >&2
        exit 1
    fi
    local store
    for store in "${STORES[@]}"; do
        if [ -e "$STATE_DIR/$store" ]; then
            chmod 600 "$STATE_DIR/$store"  # made world-readable by an older version of this
        else
            NEW_STORES+=("$STATE_DIR/$store")
        fi
    done
    trap rollback EXIT
    trap 'exit 130' INT TERM  # so that Ctrl-C during `up` rolls back too
    mkdir -p "$STATE_DIR/checkpoints" "$STATE_DIR/datasets" "$STATE_DIR/mlartifacts"
    local token password flask_key
    token=$(secret ray_token)
    password=$(secret mlflow_password)
    flask_key=$(secret mlflow_flask_key)  # signs the auth app's CSRF tokens

    # MLflow: SQLite backend, artifacts served by the server itself, basic auth on.
    cat > "$STATE_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$STATE_DIR/mlflow-auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    chmod 600 "$STATE_DIR/basic_auth.ini"
    # Job execution (MLflow's GenAI scorers and prompt optimisation; no run here uses it)
    # would start eight job-runner processes, each importing MLflow: ~20 s of two cores.
    MLFLOW_AUTH_CONFIG_PATH=$STATE_DIR/basic_auth.ini \
        MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD=$password \
        MLFLOW_FLASK_SERVER_SECRET_KEY=$flask_key MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        start mlflow "$BIN/mlflow" server --app-name basic-auth \
        --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
        --artifacts-destination "$STATE_DIR/mlartifacts" --workers 1

    # What every job on this cluster inherits (deploy/runtime_env.yaml expands these).
    export PATH=$BIN:$PATH RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$token
    export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=$password
    export UNLOCKED_CHECKPOINT_ROOT=$STATE_DIR/checkpoints UNLOCKED_DATA_ROOT=$STATE_DIR/datasets
    # `ray job stop` sends SIGTERM, then SIGKILL after this long: time for a run to finish
    # its step and write a checkpoint (Ray's default, 3 s, is not).
    export RAY_JOB_STOP_WAIT_TIME_S=60
    # `down` stops every Ray process at once, so a node has nothing to drain on SIGTERM;
    # Ray's drain (up to 30 s) would only keep `ray start --block` waiting for `down`'s SIGKILL.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
    local node_ip=()
    if [ "$WORKERS" -eq 0 ]; then
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # single-machine mode: loopback only
    else
        node_ip=(--node-ip-address=127.0.0.1)
    fi
    # Ray's socket paths must stay short, so its session files live under /tmp.
    local temp_dir
    temp_dir=$(mktemp -d /tmp/ray-cluster-XXXXXX)
    echo "$temp_dir" > "$STATE_DIR/ray_temp_dir"
    start head "$BIN/ray" start --head --block --disable-usage-stats "${node_ip[@]}" \
        --port="$GCS_PORT" --num-cpus="$CPUS" --temp-dir="$temp_dir" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" \
        --node-manager-port="$(free_port)" --object-manager-port="$(free_port)"
    wait_for head "http://127.0.0.1:$DASHBOARD_PORT/api/version"
    for i in $(seq "$WORKERS"); do
        start "worker-$i" "$BIN/ray" start --block --address="127.0.0.1:$GCS_PORT" \
            "${node_ip[@]}" --num-cpus="$CPUS" --dashboard-agent-listen-port="$(free_port)" \
            --node-manager-port="$(free_port)" --object-manager-port="$(free_port)"
    done
    wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health"
    wait_for_nodes $((WORKERS + 1))

    cat > "$STATE_DIR/env.sh" <<EOF
# source this file to talk to the local cluster
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$token
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=$password
EOF
    chmod 600 "$STATE_DIR/env.sh"  # an existing file keeps its mode through `cat >`
    trap - EXIT INT TERM
    echo "Ray dashboard and job API: http://127.0.0.1:$DASHBOARD_PORT (head + $WORKERS worker node(s))"
    echo "MLflow UI: http://127.0.0.1:$MLFLOW_PORT (user admin, password in $STATE_DIR/mlflow_password)"
    echo "next: source $STATE_DIR/env.sh"
}

down() {  # SIGTERM to every server at once; SIGKILL to any still running after 10 s
    local pidfile groups=()
    for pidfile in "$STATE_DIR"/worker-*.pid "$STATE_DIR"/head.pid "$STATE_DIR"/mlflow.pid; do
        if [ -e "$pidfile" ]; then groups+=("-$(cat "$pidfile")"); fi
    done
    if [ "${#groups[@]}" -gt 0 ]; then
        kill -TERM -- "${groups[@]}" 2>/dev/null || true
        for _ in $(seq 40); do
            any_alive "${groups[@]}" || break
            sleep 0.25
        done
        kill -KILL -- "${groups[@]}" 2>/dev/null || true
    fi
    rm -f "$STATE_DIR"/worker-*.pid "$STATE_DIR"/head.pid "$STATE_DIR"/mlflow.pid
    if [ -s "$STATE_DIR/ray_temp_dir" ]; then
        rm -rf "$(cat "$STATE_DIR/ray_temp_dir")" "$STATE_DIR/ray_temp_dir"
    fi
    echo "stopped; runs, checkpoints and datasets stay in $STATE_DIR"
}

status() {
    local pidfile
    for pidfile in "$STATE_DIR"/*.pid; do
        [ -e "$pidfile" ] || { echo "no cluster is up from $STATE_DIR"; return 0; }
        if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "$(basename "$pidfile" .pid): running"
        else
            echo "$(basename "$pidfile" .pid): exited (see $STATE_DIR/$(basename "$pidfile" .pid).log)"
        fi
    done
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(secret ray_token) \
        "$BIN/ray" status --address="127.0.0.1:$GCS_PORT" 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up|down|status (settings: see the top of this file)" >&2
        exit 2
        ;;
esac
