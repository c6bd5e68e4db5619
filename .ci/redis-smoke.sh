#!/usr/bin/env bash
# Smoke test with the stock Redis tools: starts a 3-KN local cluster (`dinomo up`),
# sets and gets keys across slots with `redis-cli -c`, runs `redis-benchmark --cluster`,
# and stops the cluster with Ctrl-C (SIGINT), checking that it stops cleanly.
# Usage: .ci/redis-smoke.sh [path/to/dinomo]   (default: the debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-${CARGO_TARGET_DIR:-target}/debug/dinomo}"
requests="${REDIS_SMOKE_REQUESTS:-100000}"
mport=17000
base=17001

for tool in redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "redis-smoke: $tool is missing" >&2; exit 1; }
done
cl_tag=redis-smoke
# shellcheck source=.ci/cluster-lib.sh
. .ci/cluster-lib.sh
dir="$(cluster_dir smoke)"
cleanup() {
  stop_cluster || true
  rm -rf "$dir"
}
trap cleanup EXIT

start_cluster "$bin" "$dir" "$mport" "$base"
cat "$dir/up.out"
# Authentication is on by default: the clients take the password from the file `up` wrote
# (REDISCLI_AUTH keeps it off the command line); first check that nothing runs without it.
[ "$(stat -c %a "$dir/requirepass")" = 600 ] || { echo "redis-smoke: the password file is not 0600" >&2; exit 1; }
r="$(timeout 10 redis-cli -p "$base" SET smoke:anon x 2>&1)"
case "$r" in NOAUTH*) ;; *) echo "redis-smoke: an unauthenticated SET answered '$r'" >&2; exit 1 ;; esac
REDISCLI_AUTH="$(cat "$dir/requirepass")"
export REDISCLI_AUTH

echo "== redis-cli -c: SET through one KN, GET through another"
for i in $(seq 1 100); do
  r="$(timeout 10 redis-cli -c -p "$base" SET "smoke:$i" "value-$i")"
  [ "$r" = "OK" ] || { echo "redis-smoke: SET smoke:$i answered '$r'" >&2; exit 1; }
done
for i in $(seq 1 100); do
  r="$(timeout 10 redis-cli -c -p $((base + 2)) GET "smoke:$i")"
  [ "$r" = "value-$i" ] || { echo "redis-smoke: GET smoke:$i answered '$r'" >&2; exit 1; }
done
owners="$(for i in $(seq 1 100); do timeout 10 redis-cli -p "$base" CLUSTER KEYSLOT "smoke:$i"; done | sort -u | wc -l)"
echo "100 keys over $owners slots, all read back"
timeout 10 redis-cli -p "$base" CLUSTER INFO | grep -q "cluster_state:ok"
timeout 10 redis-cli -p "$base" INFO | grep -E "^(rts_per_op|hit_ratio_value|cache_value_bytes):"

echo "== redis-cli: what the node does not support is refused by name, never a fake OK"
for cmd in "CONFIG SET requirepass x" "CLIENT KILL 127.0.0.1:1"; do
  # shellcheck disable=SC2086
  r="$(timeout 10 redis-cli -p "$base" $cmd 2>&1)"
  echo "$r" | grep -q "not supported" || { echo "redis-smoke: '$cmd' answered '$r'" >&2; exit 1; }
done
timeout 10 redis-cli -p "$base" CONFIG GET maxclients | grep -qx 10000

echo "== redis-benchmark -t set,get -n $requests --cluster"
out="$(timeout 600 redis-benchmark -p "$base" -a "$REDISCLI_AUTH" --cluster -t set,get -n "$requests" -q 2>&1 | tr '\r' '\n')"
echo "$out" | grep -E "requests per second|Master" || true
if echo "$out" | grep -qiE "error|fail"; then
  echo "$out" | grep -iE "error|fail" | head -5 >&2
  echo "redis-smoke: redis-benchmark reported errors" >&2
  exit 1
fi
[ "$(echo "$out" | grep -c "requests per second")" -ge 2 ] || { echo "redis-smoke: redis-benchmark did not finish" >&2; exit 1; }

echo "== stopping the cluster (SIGINT)"
stop_cluster
grep -q "cluster stopped cleanly" "$dir/up.err" || { tail -20 "$dir/up.err" >&2; exit 1; }
echo "redis-smoke: ok"
