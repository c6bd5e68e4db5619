#!/usr/bin/env bash
# Client-library compatibility: starts a 3-KN local cluster (`dinomo up`, as .ci/redis-smoke.sh
# does), runs a scripted session with redis-py's RedisCluster (scripts/compat/redis_py_cluster.py)
# and one with ioredis's Cluster (scripts/compat/ioredis_cluster.js), then
# `redis-benchmark --cluster -t set,get,incr,mset`, and stops the cluster with SIGINT, checking
# that it stops cleanly. Installs the pinned client libraries when they are missing.
#
# Usage: .ci/redis-compat.sh [path/to/dinomo]   (default: the debug build)
#        .ci/redis-compat.sh --reference        (the same run against a Redis Cluster of three
#                                                redis-server, scripts/compat/reference-cluster.sh)
# REDIS_COMPAT_INCR_N: INCRs per client of the 8 concurrent ones (default 500).
# REDIS_COMPAT_REQUESTS: redis-benchmark requests per test (default 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
compat=scripts/compat
reference=0
if [ "${1:-}" = "--reference" ]; then
  reference=1
  bin=""
else
  bin="${1:-${CARGO_TARGET_DIR:-target}/debug/dinomo}"
fi
incr_n="${REDIS_COMPAT_INCR_N:-500}"
requests="${REDIS_COMPAT_REQUESTS:-20000}"
mport=17100
base=17101
cl_tag=redis-compat

for tool in python3 node redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "redis-compat: $tool is missing" >&2; exit 1; }
done

echo "== client libraries (pinned in $compat/requirements.txt and $compat/package-lock.json)"
"$compat/install.sh"

# shellcheck source=.ci/cluster-lib.sh
. .ci/cluster-lib.sh
dir="$(cluster_dir compat)"
cleanup() {
  if [ "$reference" = 1 ]; then
    "$compat/reference-cluster.sh" stop "$dir" || true
  else
    stop_cluster || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

if [ "$reference" = 1 ]; then
  echo "== reference Redis Cluster: $(redis-server --version | grep -o 'v=[0-9.]*')"
  "$compat/reference-cluster.sh" start "$dir" "$base"
else
  echo "== dinomo up --kns 3 ($bin)"
  start_cluster "$bin" "$dir" "$mport" "$base"
  cat "$dir/up.out"
fi
[ "$(stat -c %a "$dir/requirepass")" = 600 ] || { echo "redis-compat: the password file is not 0600" >&2; exit 1; }

failed=()
echo "== redis-py RedisCluster session"
timeout 90 python3 "$compat/redis_py_cluster.py" 127.0.0.1 "$base" "$dir/requirepass" \
  --keep-going --incr-n "$incr_n" || failed+=("redis-py")

echo "== ioredis Cluster session"
timeout 90 node "$compat/ioredis_cluster.js" 127.0.0.1 "$base" "$dir/requirepass" \
  --keep-going --incr-n "$incr_n" || failed+=("ioredis")

echo "== redis-benchmark --cluster -t set,get,incr,mset -n $requests"
bench_rc=0
# redis-benchmark takes the password only as -a (as in .ci/redis-smoke.sh).
out="$(timeout 120 redis-benchmark -p "$base" -a "$(cat "$dir/requirepass")" \
  --cluster -t set,get,incr,mset -n "$requests" -q 2>&1 | tr '\r' '\n')" || bench_rc=$?
echo "$out" | grep -E "requests per second|Master" || true
if [ "$bench_rc" != 0 ]; then
  echo "$out" | tail -5 >&2
  echo "redis-compat: redis-benchmark exited with $bench_rc" >&2
  failed+=("redis-benchmark")
elif echo "$out" | grep -qiE "error|fail"; then
  echo "$out" | grep -iE "error|fail" | head -5 >&2
  echo "redis-compat: redis-benchmark reported errors" >&2
  failed+=("redis-benchmark")
elif [ "$(echo "$out" | grep -c "requests per second")" -lt 4 ]; then
  echo "redis-compat: redis-benchmark did not finish its four tests" >&2
  failed+=("redis-benchmark")
else
  # In cluster mode redis-benchmark 7.0 counts an error reply as an answer and goes on, so
  # check the data: the counters its INCR test bumped (one per master, counter:{tag}:...)
  # add up to its request count.
  total=0
  export REDISCLI_AUTH
  REDISCLI_AUTH="$(cat "$dir/requirepass")"
  for port in "$base" $((base + 1)) $((base + 2)); do
    keys="$(timeout 10 redis-cli -p "$port" KEYS 'counter:*' 2>&1)" || true
    for key in $keys; do
      case "$key" in
        counter:*) ;;
        *) echo "redis-compat: KEYS counter:* on $port answered '$keys'" >&2; total=-1; break 2 ;;
      esac
      v="$(timeout 10 redis-cli -p "$port" GET "$key" 2>&1)" || true
      [[ "$v" =~ ^[0-9]+$ ]] || { echo "redis-compat: GET $key on $port answered '$v'" >&2; total=-1; break 2; }
      total=$((total + v))
    done
  done
  unset REDISCLI_AUTH
  if [ "$total" != "$requests" ]; then
    echo "redis-compat: the INCR counters of redis-benchmark add up to $total, not $requests" >&2
    failed+=("redis-benchmark INCR total")
  else
    echo "redis-benchmark's INCR counters add up to $total"
  fi
fi

if [ "$reference" = 0 ]; then
  echo "== stopping the cluster (SIGINT)"
  stop_cluster || failed+=("clean stop")
  grep -q "cluster stopped cleanly" "$dir/up.err" || { tail -20 "$dir/up.err" >&2; failed+=("clean stop"); }
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "redis-compat: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "redis-compat: ok (redis-py session, ioredis session, redis-benchmark)"
