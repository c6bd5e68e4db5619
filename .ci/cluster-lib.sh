# shellcheck shell=bash
# Shared by .ci/redis-smoke.sh and .ci/redis-compat.sh (sourced, not run): start a local
# DINOMO cluster with `dinomo up` in a fresh directory, wait for it, and stop it with
# Ctrl-C (SIGINT), checking that it stops. The caller sets `cl_tag` (the prefix of its
# messages) and traps EXIT to call stop_cluster and remove the directory.

up_pid=""

# cluster_dir TAG [PARENT]: a fresh directory for a cluster under PARENT (default: tmpfs
# when there is one), printed.
cluster_dir() {
  local parent="${2:-/dev/shm}"
  [ -d "$parent" ] || parent="${TMPDIR:-/tmp}"
  mktemp -d "$parent/dinomo-$1.XXXXXX"
}

# start_cluster BIN DIR MANAGER_PORT BASE_PORT [UP_ARGS...]: `dinomo up` in the background
# (up_pid) with UP_ARGS (default: --kns 3 --region-size 512M), its output in DIR/up.out and
# DIR/up.err; returns once it says "cluster up", exits the script when it does not within
# 60 s.
start_cluster() {
  local bin="$1" dir="$2" mport="$3" base="$4"
  shift 4
  [ "$#" -gt 0 ] || set -- --kns 3 --region-size 512M
  "$bin" up "$@" --dir "$dir" --fresh \
    --manager-port "$mport" --base-port "$base" >"$dir/up.out" 2>"$dir/up.err" &
  up_pid=$!
  for _ in $(seq 1 600); do
    grep -q "cluster up" "$dir/up.out" 2>/dev/null && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$dir/up.err" >&2; echo "$cl_tag: dinomo up exited" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "cluster up" "$dir/up.out" || { tail -50 "$dir/up.err" >&2; echo "$cl_tag: no cluster within 60 s" >&2; exit 1; }
}

# stop_cluster: SIGINT, then up to cl_stop_s seconds (default 60) for `dinomo up` to exit;
# its exit status, or 1 (after SIGKILL) when it did not stop in time. Does nothing when no
# cluster runs.
stop_cluster() {
  [ -n "$up_pid" ] || return 0
  local secs="${cl_stop_s:-60}"
  kill -INT "$up_pid" 2>/dev/null || true
  for _ in $(seq 1 $((secs * 10))); do
    kill -0 "$up_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$up_pid" 2>/dev/null; then
    echo "$cl_tag: the cluster did not stop within $secs s" >&2
    kill -KILL "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
    up_pid=""
    return 1
  fi
  local rc=0
  wait "$up_pid" || rc=$?
  up_pid=""
  return "$rc"
}
