#!/usr/bin/env bash
# A process cluster over RDMA verbs, checked with the stock clients; runs where an RDMA
# device is (in CI: inside the soft-RoCE VM):
#
#   scripts/rxe-vm --timeout 900 -- scripts/verbs-cluster.sh target/debug/dinomo
#
# 1. `dinomo up --fabric verbs` (DPM, manager, 3 KNs; authentication on) in a private
#    folder; an unauthenticated client gets NOAUTH.
# 2. `dinomo bench --target` (one client, fixed seed) against the fresh cluster; rxe's
#    packet counter must show that the traffic went over the device.
# 3. `redis-cli -c` SETs keys through one KN and GETs them through another; every KN must
#    have taken writes.
# 4. redis-py's `redis.cluster.RedisCluster` writes and reads back a few hundred keys
#    spread over all three KNs.
# 5. The same bench against the same cluster over shm; the two runs' RTs/op, verbs/op and
#    hit ratios must agree within sampling error (see "comparison" at the end).
# 6. Ctrl-C (SIGINT) to `dinomo up` stops each cluster; it must say it stopped cleanly.
#
# Environment: DINOMO_RDMA_DEVICE (default rxe0), DINOMO_RDMA_GID_INDEX (default 1),
# VERBS_CLUSTER_KNS (default 3), VERBS_CLUSTER_OPS (measured bench operations, default
# 1000), VERBS_CLUSTER_KEEP=1 keeps the folder. Exits non-zero with a message naming the failed check.
set -euo pipefail

bin_arg=${1:?usage: scripts/verbs-cluster.sh path/to/dinomo | --compare VERBS.json SHM.json}
device=${DINOMO_RDMA_DEVICE:-rxe0}
gid=${DINOMO_RDMA_GID_INDEX:-1}
ops=${VERBS_CLUSTER_OPS:-1000}
kns=${VERBS_CLUSTER_KNS:-3}

say() { printf '[verbs-cluster %s] %s\n' "$(date +%T)" "$*"; }
die() {
	printf 'verbs-cluster: FAILED: %s\n' "$*" >&2
	exit 1
}

# redis-py: the Debian package installs for the system interpreter, which need not be
# the first python3 on PATH.
python=""
for p in /usr/bin/python3 python3; do
	if command -v "$p" >/dev/null && "$p" -c 'import redis.cluster' 2>/dev/null; then
		python=$p
		break
	fi
done
[[ -n $python ]] || die "no python3 with redis-py (redis.cluster); Debian: python3-redis"

# compare VERBS.json SHM.json: the two bench --target results agree within sampling error.
# The two runs issue the same operations (one client, one seed), but the counters still
# differ by chance: when the memory node merges a KN's writes and which cached items are
# evicted depend on timing. Treat each figure as a mean over the run's operations:
# * a hit ratio p over g reads has a standard error sqrt(p(1-p)/g);
# * a per-operation count m (RTs/op, verbs/op) over n operations is taken as Poisson-like,
#   standard error sqrt(m/n).
# A difference beyond 4 standard errors of the difference (plus 0.01 for rounding) is a
# clear mismatch: by chance it happens far less than once in 10^4 runs.
compare() {
	"$python" - "$1" "$2" <<'PY'
import json, math, sys

v, s = (json.load(open(p)) for p in sys.argv[1:3])
bad = []

def row(name, a, b, tol):
    ok = abs(a - b) <= tol
    print(f"  {name:<22} verbs {a:8.4f}   shm {b:8.4f}   |diff| {abs(a - b):.4f}   tolerance {tol:.4f}   {'ok' if ok else 'MISMATCH'}")
    if not ok:
        bad.append(name)

for r, name in ((v, "verbs"), (s, "shm")):
    for f in ("rts_per_op", "verbs_per_op", "hit"):
        if r.get(f) is None:
            sys.exit(f"the {name} run reports no {f}: the KNs' INFO counters are missing")
    if r["missing"] != 0:
        sys.exit(f"the {name} run read {r['missing']} loaded keys as missing")
    print(f"{name}: {r['ops']} ops ({r['reads']} reads, {r['writes']} writes), "
          f"{r['throughput_ops']:.0f} ops/s, p50 {r['latency_us']['p50']:.0f} us")
if (v["reads"], v["writes"]) != (s["reads"], s["writes"]):
    sys.exit(f"the runs did different work: verbs {v['reads']}/{v['writes']}, shm {s['reads']}/{s['writes']} reads/writes")
n = v["ops"]
reads = max(v["reads"], 1)
print("verbs vs shm (4 standard errors + 0.01):")
for f in ("rts_per_op", "verbs_per_op", "read_rts_per_read", "write_rts_per_write"):
    a, b = v[f], s[f]
    if a is None or b is None:
        continue
    count = reads if f == "read_rts_per_read" else (max(v["writes"], 1) if f == "write_rts_per_write" else n)
    row(f, a, b, 4 * math.sqrt((a + b) / count) + 0.01)
for h in ("value", "shortcut", "local", "miss"):
    a, b = v["hit"][h], s["hit"][h]
    p = (a + b) / 2
    row(f"hit {h}", a, b, 4 * math.sqrt(2 * p * (1 - p) / reads) + 0.01)
if bad:
    sys.exit("mismatch in " + ", ".join(bad))
PY
}

# `--compare A.json B.json` runs only the comparison (to check the check).
if [[ $bin_arg == --compare ]]; then
	compare "$2" "$3"
	exit
fi
bin=$(realpath -e -- "$bin_arg")
command -v redis-cli >/dev/null || die "redis-cli is missing (Debian: redis-tools)"

parent=/dev/shm
[[ -d $parent && -w $parent ]] || parent=${TMPDIR:-/tmp}
work=$(mktemp -d "$parent/verbs-cluster.XXXXXX")
chmod 0700 "$work"
up_pid=""

# Ctrl-C semantics: SIGINT to `up`, which stops the KNs, the manager and the DPM in turn.
stop_cluster() {
	local dir=$1
	[[ -n $up_pid ]] || return 0
	kill -INT "$up_pid" 2>/dev/null || true
	local i
	for ((i = 0; i < 1200; i++)); do
		kill -0 "$up_pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$up_pid" 2>/dev/null; then
		kill -KILL "$up_pid" 2>/dev/null || true
		wait "$up_pid" 2>/dev/null || true
		up_pid=""
		tail -n 20 "$dir/up.err" >&2
		die "dinomo up did not stop within 120 s of SIGINT"
	fi
	local rc=0
	wait "$up_pid" || rc=$?
	up_pid=""
	if ((rc != 0)) || ! grep -q "cluster stopped cleanly" "$dir/up.err"; then
		tail -n 20 "$dir/up.err" >&2
		die "dinomo up exited with $rc after SIGINT, without 'cluster stopped cleanly'"
	fi
	say "cluster stopped cleanly"
}
cleanup() {
	if [[ -n $up_pid ]]; then
		kill -INT "$up_pid" 2>/dev/null || true
		sleep 2
		kill -KILL "$up_pid" 2>/dev/null || true
	fi
	if [[ ${VERBS_CLUSTER_KEEP:-0} == 1 ]]; then
		echo "verbs-cluster: kept $work" >&2
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

# start_cluster NAME MANAGER_PORT FABRIC_ARGS...: `dinomo up` in $work/NAME, KNs on
# MANAGER_PORT+1.., returns once it reports "cluster up".
start_cluster() {
	local name=$1 mport=$2
	shift 2
	local dir=$work/$name
	mkdir -m 0700 "$dir"
	# A small cache per KN, so that reads take every path (value, shortcut, miss); one
	# shard and one connection thread per KN, as CPU in an emulated VM is scarce; leases
	# of 20 s, as a process there can stall for seconds (no failure is tested here).
	printf 'cache = "64K"\nthreads = 1\nio_threads = 1\nlease_ms = 20000\n' >"$dir/up.toml"
	"$bin" up --config "$dir/up.toml" --dir "$dir" --fresh --kns "$kns" --region-size 64M \
		--manager-port "$mport" --base-port $((mport + 1)) "$@" >"$dir/up.out" 2>"$dir/up.err" &
	up_pid=$!
	local i
	for ((i = 0; i < 1800; i++)); do
		grep -q "cluster up" "$dir/up.out" 2>/dev/null && break
		if ! kill -0 "$up_pid" 2>/dev/null; then
			up_pid=""
			tail -n 30 "$dir/up.err" >&2
			die "dinomo up ($name) exited before the cluster was up"
		fi
		sleep 0.1
	done
	grep -q "cluster up" "$dir/up.out" || { tail -n 30 "$dir/up.err" >&2; die "no cluster ($name) within 180 s"; }
	say "$name: $(grep "cluster up" "$dir/up.out")"
	[[ $(stat -c %a "$dir/requirepass") == 600 ]] || die "$dir/requirepass is not mode 0600"
}

# bench NAME PORT: the fixed, small `dinomo bench --target` run, JSON into $work/NAME.json.
bench() {
	local name=$1 port=$2
	# One client: with a fixed seed the same operations in the same order on both fabrics.
	"$bin" bench --target "127.0.0.1:$port" --password-file "$work/$name/requirepass" \
		--clients 1 --seed 42 --keys 1000 --value-size 256 --workload read-mostly \
		--ops "$ops" --warmup 200 --quiet --json "$work/$name.json" ||
		die "dinomo bench --target against the $name cluster failed"
}

# ------------------------------------------------------------------------ verbs cluster
say "device $device, GID index $gid; $bin"
base=17101
start_cluster verbs 17100 --fabric verbs --device "$device" --gid-index "$gid"
dir=$work/verbs
# Every KN and the manager must have been told to use verbs (not silently shm).
verbs_roles=$(pgrep -a -f -- "^$bin (kn|manager) .*--fabric verbs" | wc -l)
((verbs_roles == kns + 1)) || die "$verbs_roles KN/manager processes run with --fabric verbs, want $((kns + 1))"

r=$(timeout 20 redis-cli -p "$base" SET anon x 2>&1 || true)
[[ $r == NOAUTH* ]] || die "an unauthenticated SET answered '$r' (want NOAUTH)"
REDISCLI_AUTH=$(<"$dir/requirepass")
export REDISCLI_AUTH

# The bench first, on the fresh cluster, as over shm below: both start from the same state.
say "dinomo bench --target over verbs ($ops ops)"
packets() { rdma statistic show link "$device/1" 2>/dev/null | grep -oE 'sent_pkts [0-9]+' | cut -d' ' -f2; }
sent0=$(packets)
bench verbs "$base"
sent1=$(packets)
if [[ -n $sent0 && -n $sent1 ]]; then
	((sent1 > sent0 + ops)) || die "$device sent $((sent1 - sent0)) packets during the bench: the cluster did not use it"
	say "$device sent $((sent1 - sent0)) RoCE packets during the bench"
else
	die "cannot read $device's packet counters (rdma statistic show link $device/1)"
fi

last=$((base + kns - 1))
say "redis-cli -c: 20 keys SET through port $base, GET through port $last"
for i in $(seq 1 20); do
	r=$(timeout 20 redis-cli -c -p "$base" SET "cli:$i" "value-$i") || die "redis-cli SET cli:$i failed"
	[[ $r == OK ]] || die "SET cli:$i answered '$r'"
done
for i in $(seq 1 20); do
	r=$(timeout 20 redis-cli -c -p "$last" GET "cli:$i") || die "redis-cli GET cli:$i failed"
	[[ $r == "value-$i" ]] || die "GET cli:$i answered '$r' (want value-$i)"
done
r=$(timeout 20 redis-cli -c -p "$base" GET cli:nope)
[[ -z $r ]] || die "GET of a key never written answered '$r'"
for ((k = 0; k < kns; k++)); do
	puts=$(timeout 20 redis-cli -p $((base + k)) INFO dinomo | tr -d '\r' | sed -n 's/^puts://p')
	[[ $puts =~ ^[0-9]+$ ]] && ((puts > 0)) || die "KN on port $((base + k)) took no SET (puts '$puts')"
	say "KN $((base + k)): $puts SETs"
done
timeout 20 redis-cli -p "$base" CLUSTER INFO | tr -d '\r' | grep -qx "cluster_state:ok" ||
	die "CLUSTER INFO does not say cluster_state:ok"

say "redis-py RedisCluster: 300 keys written and read back"
"$python" - "$base" "$kns" <<'PY' || die "the redis-py check failed (see above)"
import os, sys
from redis.cluster import RedisCluster

port, kns = int(sys.argv[1]), int(sys.argv[2])
rc = RedisCluster(host="127.0.0.1", port=port, password=os.environ["REDISCLI_AUTH"],
                  socket_timeout=30)
nodes = rc.get_nodes()
if len(nodes) != kns:
    sys.exit(f"redis-py sees {len(nodes)} nodes, want {kns}")
keys = {f"py:{i}": f"py-value-{i}-" + "x" * (i % 50) for i in range(300)}
for k, v in keys.items():
    if rc.set(k, v) is not True:
        sys.exit(f"SET {k} did not answer OK")
wrong = [k for k, v in keys.items() if rc.get(k) != v.encode()]
if wrong:
    sys.exit(f"{len(wrong)} keys read back wrong, e.g. {wrong[:5]}")
owners = {rc.get_node_from_key(k).name for k in keys}
if len(owners) != kns:
    sys.exit(f"the keys landed on {len(owners)} nodes, want {kns}")
if rc.get("py:never-written") is not None:
    sys.exit("a key never written has a value")
rc.close()
print(f"redis-py: {len(keys)} keys over {len(owners)} nodes read back")
PY

stop_cluster "$dir"

# ------------------------------------------------------------------------ shm cluster
base=17201
start_cluster shm 17200 --fabric shm
say "dinomo bench --target over shm ($ops ops)"
bench shm "$base"
stop_cluster "$work/shm"

# ------------------------------------------------------------------------ comparison
compare "$work/verbs.json" "$work/shm.json" || die "bench --target over verbs and over shm disagree (see above)"
say "all checks passed"
