#!/usr/bin/env bash
# A reference Redis Cluster to check the client compatibility scripts against Redis itself:
# three `redis-server --cluster-enabled yes` masters on loopback, password-protected (the
# password in DIR/requirepass, 0600, like `dinomo up` writes it), slots spread by
# `redis-cli --cluster create --cluster-replicas 0`.
#
# Usage:
#   scripts/compat/reference-cluster.sh start DIR [BASE_PORT]   (default port 27001; the
#       nodes listen on BASE_PORT..BASE_PORT+2; returns once cluster_state is ok)
#   scripts/compat/reference-cluster.sh stop DIR                (stops them, keeps DIR)
#   scripts/compat/reference-cluster.sh run [BASE_PORT]         (start in a temp dir, run
#       both client scripts against it, stop, remove the temp dir)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

die() { echo "reference-cluster: $*" >&2; exit 1; }

start() {
  local dir="$1" base="${2:-27001}" port i
  for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install redis-server)"
  done
  mkdir -p "$dir"
  (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/requirepass")
  local pass
  pass="$(cat "$dir/requirepass")"
  for i in 0 1 2; do
    port=$((base + i))
    mkdir -p "$dir/n$port"
    # The password goes in a config file, not on the command line (ps shows that).
    (umask 077 && cat >"$dir/n$port/redis.conf" <<EOF
port $port
bind 127.0.0.1
cluster-enabled yes
cluster-config-file $dir/n$port/nodes.conf
cluster-node-timeout 5000
requirepass $pass
masterauth $pass
dir $dir/n$port
save ""
appendonly no
daemonize yes
pidfile $dir/n$port/redis.pid
logfile $dir/n$port/redis.log
EOF
    )
    redis-server "$dir/n$port/redis.conf" || die "redis-server on port $port did not start"
    echo "$port" >>"$dir/ports"
  done
  export REDISCLI_AUTH="$pass"
  for i in 0 1 2; do
    port=$((base + i))
    for _ in $(seq 1 100); do
      [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && break
      sleep 0.1
    done
    [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] || die "no PONG from port $port"
  done
  redis-cli --cluster create "127.0.0.1:$base" "127.0.0.1:$((base + 1))" \
    "127.0.0.1:$((base + 2))" --cluster-replicas 0 --cluster-yes >"$dir/create.out" 2>&1 \
    || { cat "$dir/create.out" >&2; die "redis-cli --cluster create failed"; }
  for _ in $(seq 1 200); do
    local ok=0
    for i in 0 1 2; do
      redis-cli -p $((base + i)) CLUSTER INFO | grep -q "cluster_state:ok" && ok=$((ok + 1))
    done
    [ "$ok" = 3 ] && break
    sleep 0.1
  done
  [ "$ok" = 3 ] || die "cluster_state is not ok on every node within 20 s"
  echo "reference cluster up: 127.0.0.1:$base..$((base + 2)), password in $dir/requirepass"
}

stop() {
  local dir="$1" port pid
  [ -f "$dir/ports" ] || return 0
  while read -r port; do
    pid="$(cat "$dir/n$port/redis.pid" 2>/dev/null || true)"
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null || true; }
  done <"$dir/ports"
  rm -f "$dir/ports"
}

case "${1:-}" in
  start) [ $# -ge 2 ] || die "usage: $0 start DIR [BASE_PORT]"; start "$2" "${3:-}" ;;
  stop) [ $# -ge 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
  run)
    base="${2:-27001}"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/redis-reference.XXXXXX")"
    trap 'stop "$dir"; rm -rf "$dir"' EXIT
    "$here/install.sh"
    start "$dir" "$base"
    rc=0
    python3 "$here/redis_py_cluster.py" 127.0.0.1 "$base" "$dir/requirepass" || rc=1
    node "$here/ioredis_cluster.js" 127.0.0.1 "$base" "$dir/requirepass" || rc=1
    [ "$rc" = 0 ] && echo "reference-cluster: both client scripts passed against Redis $(redis-server --version | grep -o 'v=[0-9.]*')"
    exit "$rc"
    ;;
  *) die "usage: $0 start DIR [BASE_PORT] | stop DIR | run [BASE_PORT]" ;;
esac
