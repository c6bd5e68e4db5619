#!/usr/bin/env bash
# The resident memory of one KN against its cache budget: starts a local cluster with one
# KN (`dinomo up`), records the KN's anonymous resident memory at idle, fills it with
# `redis-benchmark -t set`, waits until it is quiet, records it again with the cache's own
# counters (INFO dinomo), and writes summary.json and summary.txt.
#
#   scripts/kn-memory.sh --out /tmp/mem                     # 2M SETs of 1000 B, cache 64M
#   scripts/kn-memory.sh --value-size 100 --out /tmp/mem100
#
# See --help. Slow (minutes): not part of .ci/run. Exit status: 0 when the run completed
# and its checks passed, 1 when a run or a check failed, 2 on bad usage or a missing tool.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/kn-memory.sh [OPTIONS]

Measures how much anonymous memory a KN holds for its cache:
  1. `dinomo up` with one KN (a DPM, a manager and the KN, shm fabric, authentication on,
     every process on 127.0.0.1, a fresh region), cache SIZE;
  2. the KN's RssAnon, RssFile, RssShmem, VmRSS and VmHWM (/proc/PID/status) once it is
     ready and quiet: the fixed overhead at idle;
  3. redis-benchmark -t set -n N -r KEYSPACE -d D -P 32 -c CLIENTS against it (one KN owns
     every slot, so without --cluster; keys are `key:` + 12 digits, 16 bytes);
  4. once the KN is quiet again (CPU and RssAnon steady for 5 s): the same figures, and
     INFO dinomo's cache counters (values, shortcuts, charged bytes, budget).
RssAnon is the KN's heap and stacks. The region the KN reaches through the shm fabric is a
mapped file (tmpfs: RssShmem, a disk file: RssFile) and is not counted in it.

Options:
      --bin PATH        the dinomo binary, a release build (default: build and use
                        $CARGO_TARGET_DIR/release/dinomo, else target/release/dinomo)
      --cache SIZE      cache of the KN, split over its shards (default 64M)
      --shards N        shards (shard threads) of the KN, `dinomo up --threads` (default 2,
                        as `dinomo up`)
  -n, --requests N      SET requests (default 2000000)
  -r, --keyspace N      redis-benchmark -r: keys are drawn from N (default 2000000)
  -d, --value-size D    value bytes (default 1000)
  -c, --clients N       redis-benchmark connections (default 50, as redis-benchmark)
      --region-size S   region size (default: enough for every SET's log entry, at least
                        1G; 4G for the defaults)
      --base DIR        folder in which the cluster's folder and region are made (default
                        /dev/shm, else $TMPDIR or /tmp); it must have room for the region
      --out DIR         results folder (default: ${TMPDIR:-/tmp}/kn-memory.<UTC time>)
  -h, --help            this text

Results in --out: summary.json and summary.txt (budget, idle and loaded RssAnon, the growth,
its ratio to the budget, values, shortcuts, charged bytes, bytes per cached key),
status-{idle,loaded}.txt and smaps_rollup-{idle,loaded}.txt (/proc of the KN),
info-{idle,loaded}.txt (INFO all), bench.csv, rss.txt (RssAnon each second), up.log.
EOF
}

die() { echo "kn-memory: $*" >&2; exit 2; }

cd "$(dirname "$0")/.." || exit 2
BIN=
CACHE=64M
SHARDS=2
N=2000000
KEYSPACE=2000000
DATASIZE=1000
CLIENTS=50
PIPELINE=32
KEYLEN=16
REGION=
if [[ -d /dev/shm ]]; then BASE=/dev/shm; else BASE=${TMPDIR:-/tmp}; fi
OUT=

need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --bin) need "$@"; BIN=$2; shift 2 ;;
    --cache) need "$@"; CACHE=$2; shift 2 ;;
    --shards) need "$@"; SHARDS=$2; shift 2 ;;
    -n | --requests) need "$@"; N=$2; shift 2 ;;
    -r | --keyspace) need "$@"; KEYSPACE=$2; shift 2 ;;
    -d | --value-size) need "$@"; DATASIZE=$2; shift 2 ;;
    -c | --clients) need "$@"; CLIENTS=$2; shift 2 ;;
    --region-size) need "$@"; REGION=$2; shift 2 ;;
    --base) need "$@"; BASE=$2; shift 2 ;;
    --out) need "$@"; OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "kn-memory: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for v in SHARDS N KEYSPACE DATASIZE CLIENTS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
# Bytes of a size such as 64M (binary units, as `dinomo` reads them).
size_bytes() {
    [[ $1 =~ ^([0-9]+)([KMGkmg]?)$ ]] || return 1
    local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]^^}
    case $u in
    K) echo $((n << 10)) ;;
    M) echo $((n << 20)) ;;
    G) echo $((n << 30)) ;;
    *) echo "$n" ;;
    esac
}
BUDGET=$(size_bytes "$CACHE") || die "--cache must be a size such as 64M (got '$CACHE')"
# The log holds every SET (key, value and an entry header, counted as 64 bytes here) until
# it is merged and reclaimed; the region gives 12% to the index. Half again as much as the
# SETs need, rounded up to whole GiB: no run depends on reclaim keeping up.
if [[ -z $REGION ]]; then
    REGION="$(((N * (KEYLEN + DATASIZE + 64) * 3 / 2 * 100 / 88 + (1 << 30) - 1) >> 30))G"
    [[ $REGION == 0G ]] && REGION=1G
fi
REGION_BYTES=$(size_bytes "$REGION") || die "--region-size must be a size such as 4G (got '$REGION')"

declare -A PKG=([redis-cli]=redis-tools [redis-benchmark]=redis-tools [awk]=gawk [df]=coreutils
    [timeout]=coreutils [ps]=procps [od]=coreutils)
for t in redis-cli redis-benchmark awk df timeout ps od; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install ${PKG[$t]})"
done
if [[ -z $BIN ]]; then
    BIN=${CARGO_TARGET_DIR:-target}/release/dinomo
    echo "kn-memory: cargo build --release --bin dinomo"
    nice cargo build --release --bin dinomo || die "the release build failed"
fi
[[ -x $BIN ]] || die "$BIN is not an executable: build it (cargo build --release --bin dinomo) or give --bin"
[[ $BIN == */release/* ]] ||
    echo "kn-memory: warning: $BIN is not under a release/ folder; the figures are meant for a release build" >&2
BIN_EXE=$(readlink -f "$BIN")
[[ -d $BASE && -w $BASE ]] || die "--base $BASE is not a writable folder"
AVAIL=$(df --output=avail -B1 "$BASE" | tail -1 | tr -d ' ')
# The region file is sparse, but a full run touches most of it.
((AVAIL > REGION_BYTES + (REGION_BYTES >> 3))) ||
    die "$BASE has $((AVAIL >> 20)) MiB free, too little for a $REGION region (give --base or --region-size)"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-${TMPDIR:-/tmp}/kn-memory.$STAMP}
mkdir -p "$OUT" || die "cannot make the results folder $OUT"
OUT=$(cd "$OUT" && pwd)

cl_tag=kn-memory
cl_stop_s=300
# shellcheck source=.ci/cluster-lib.sh
. .ci/cluster-lib.sh
# shellcheck source=scripts/proc-lib.sh
. scripts/proc-lib.sh

DIR=
UP_TREE=()
BENCH_PID=
SAMPLER_PID=
# `dinomo up` stops its cluster in order on SIGINT; its children run in their own process
# groups, so any that outlive it (it was killed, or a child hung) are killed one by one.
cleanup() {
    local status=$? p
    trap - EXIT INT TERM HUP
    [[ -n $BENCH_PID ]] && kill -TERM "$BENCH_PID" 2>/dev/null
    [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null
    stop_cluster || true
    for p in "${UP_TREE[@]}"; do
        if alive_as "$p" "$BIN_EXE"; then
            echo "kn-memory: killing leftover dinomo process $p" >&2
            kill -KILL "$p" 2>/dev/null
        fi
    done
    [[ -f $DIR/up.out ]] && cat "$DIR/up.out" "$DIR/up.err" >"$OUT/up.log" 2>/dev/null
    [[ -n $DIR && -d $DIR ]] && rm -rf "$DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'echo "kn-memory: interrupted" >&2; exit 1' INT TERM HUP

# redis-cli with the password kept out of the process list.
rcli() { REDISCLI_AUTH=$KPASS timeout 60 redis-cli --no-auth-warning -h 127.0.0.1 -p "$KPORT" "$@"; }
# Field $1 (kB) of the KN's /proc/PID/status.
status_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$KN_PID/status"; }
# User + system CPU ticks of the KN.
kn_ticks() { sed 's/.*) //' "/proc/$KN_PID/stat" | awk '{ print $12 + $13 }'; }

# Waits (at most $1 s) until the KN's CPU use stays under 5% and its RssAnon moves less than
# 256 KiB, each second for 5 s in a row; prints "true", or "false" when it never did.
wait_quiet() {
    local max=$1 i calm=0 t0 t1 r0 r1
    t0=$(kn_ticks)
    r0=$(status_kb RssAnon)
    for ((i = 0; i < max; i++)); do
        sleep 1
        t1=$(kn_ticks)
        r1=$(status_kb RssAnon)
        if (((t1 - t0) * 100 / $(getconf CLK_TCK) < 5 && (r1 - r0 < 256 && r0 - r1 < 256))); then
            calm=$((calm + 1))
            ((calm >= 5)) && { echo true; return 0; }
        else
            calm=0
        fi
        t0=$t1
        r0=$r1
    done
    echo false
}

declare -A M
# snapshot NAME: the KN's memory figures and INFO now, into M[NAME,...] and files.
snapshot() {
    local name=$1 f info
    cat "/proc/$KN_PID/status" >"$OUT/status-$name.txt"
    cat "/proc/$KN_PID/smaps_rollup" >"$OUT/smaps_rollup-$name.txt" 2>/dev/null || true
    for f in RssAnon RssFile RssShmem VmRSS VmHWM; do M[$name,$f]=$(status_kb "$f"); done
    info=$(rcli INFO all)
    printf '%s\n' "$info" | tr -d '\r' >"$OUT/info-$name.txt"
    for f in cache_values cache_shortcuts cache_value_bytes cache_shortcut_bytes cache_budget_bytes puts wrong_owner; do
        M[$name,$f]=$(info_field "$info" "$f")
    done
    M[$name,keys]=$(awk -F'[=,:]' '$1 == "db0" { print $3 + 0 }' <<<"$info" | tr -d '\r')
    M[$name,keys]=${M[$name,keys]:-0}
    echo "  $name: RssAnon ${M[$name,RssAnon]} kB, RssFile ${M[$name,RssFile]} kB, RssShmem ${M[$name,RssShmem]} kB, VmHWM ${M[$name,VmHWM]} kB; keys ${M[$name,keys]}, cached values ${M[$name,cache_values]}, shortcuts ${M[$name,cache_shortcuts]}, charged $((M[$name,cache_value_bytes] + M[$name,cache_shortcut_bytes])) B"
}

# ---- cluster ---------------------------------------------------------------------------------
DINOMO_REV=$(dinomo_build "$BIN")
DIR=$(cluster_dir memory "$BASE")
MPORT=$(free_ports 2) || die "found no free ports"
KPORT=$((MPORT + 1))
cat >"$DIR/up.toml" <<EOF
kns = 1
region_size = "$REGION"
host = "127.0.0.1"
threads = $SHARDS
cache = "$CACHE"
auth = true
EOF
cp "$DIR/up.toml" "$OUT/up.toml"
echo "kn-memory: dinomo $BIN ($DINOMO_REV); one KN, $SHARDS shard(s), cache $CACHE, region $REGION in $DIR ($(stat -f -c %T "$DIR")); results in $OUT"
start_cluster "$BIN" "$DIR" "$MPORT" "$KPORT" --config "$DIR/up.toml"
mapfile -t UP_TREE < <(descendants "$up_pid")
KN_PID=
for p in "${UP_TREE[@]}"; do
    case " $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) " in
    *" kn "*) [[ -z $KN_PID ]] || die "more than one KN process under dinomo up"; KN_PID=$p ;;
    esac
done
[[ -n $KN_PID ]] || die "found no KN process under dinomo up (processes: ${UP_TREE[*]})"
KPASS=$(cat "$DIR/requirepass")
for ((i = 0; i < 300; i++)); do
    [[ $(rcli PING 2>/dev/null) == PONG ]] && break
    sleep 0.1
done
[[ $(rcli PING 2>/dev/null) == PONG ]] || { echo "kn-memory: the KN does not answer PING on 127.0.0.1:$KPORT" >&2; exit 1; }
echo "kn-memory: KN pid $KN_PID at 127.0.0.1:$KPORT"

echo "kn-memory: waiting for the idle KN to be quiet"
QUIET_IDLE=$(wait_quiet 60)
snapshot idle

# ---- load ------------------------------------------------------------------------------------
# RssAnon every second while the benchmark runs and the KN settles.
(while kill -0 "$KN_PID" 2>/dev/null; do
    echo "$(date -u +%s) $(awk '$1 == "RssAnon:" { print $2 }' "/proc/$KN_PID/status" 2>/dev/null)"
    sleep 1
done) >"$OUT/rss.txt" &
SAMPLER_PID=$!
CMD=(redis-benchmark -h 127.0.0.1 -p "$KPORT" -a "$KPASS" -t set -n "$N" -r "$KEYSPACE" -d "$DATASIZE"
    -c "$CLIENTS" -P "$PIPELINE" --csv)
CMD_SHOWN="${CMD[*]}"
CMD_SHOWN=${CMD_SHOWN/-a $KPASS/-a PASSWORD}
echo "kn-memory: $CMD_SHOWN"
T0=$(date +%s.%N)
set +e
timeout 7200 "${CMD[@]}" >"$OUT/bench.csv" 2>"$OUT/bench.stderr" &
BENCH_PID=$!
wait "$BENCH_PID"
RC=$?
set -e
BENCH_PID=
T1=$(date +%s.%N)
BENCH_S=$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }')
FAILED=0
if ((RC != 0)); then
    echo "kn-memory: redis-benchmark exited with $RC: $(head -c 400 "$OUT/bench.stderr")" >&2
    FAILED=1
fi
if grep -qi error "$OUT/bench.csv" "$OUT/bench.stderr"; then
    echo "kn-memory: redis-benchmark printed errors: $(grep -hi error "$OUT/bench.csv" "$OUT/bench.stderr" | head -3 | tr '\n' ' ')" >&2
    FAILED=1
fi
RPS=$(awk -F, '$1 == "\"SET\"" { gsub("\"", "", $2); print $2 }' "$OUT/bench.csv")
echo "kn-memory: redis-benchmark took $BENCH_S s (${RPS:-?} SET/s); waiting for the KN to be quiet"
QUIET_LOADED=$(wait_quiet 300)
snapshot loaded
kill -TERM "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=

PUTS=$((M[loaded,puts] - M[idle,puts]))
((PUTS >= N)) || { echo "kn-memory: the KN counted $PUTS puts, fewer than the $N SETs sent" >&2; FAILED=1; }
WRONG=$((M[loaded,wrong_owner] - M[idle,wrong_owner]))
((WRONG == 0)) || { echo "kn-memory: $WRONG requests were answered MOVED" >&2; FAILED=1; }
[[ $QUIET_IDLE == true && $QUIET_LOADED == true ]] ||
    echo "kn-memory: warning: the KN was not quiet (idle: $QUIET_IDLE, loaded: $QUIET_LOADED); the figures were taken anyway" >&2

# ---- summary ---------------------------------------------------------------------------------
PEAK=$(awk 'NF == 2 && $2 > m { m = $2 } END { print m + 0 }' "$OUT/rss.txt")
CACHED=$((M[loaded,cache_values] + M[loaded,cache_shortcuts]))
CHARGED=$((M[loaded,cache_value_bytes] + M[loaded,cache_shortcut_bytes]))
ANON_IDLE=$((M[idle,RssAnon] * 1024))
ANON_LOADED=$((M[loaded,RssAnon] * 1024))
GROWTH=$((ANON_LOADED - ANON_IDLE))
div() { awk -v a="$1" -v b="$2" -v p="${3:-3}" 'BEGIN { if (b == 0) print "null"; else printf "%.*f", p, a / b }'; }
MEM_GIB=$(awk '$1 == "MemTotal:" { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
cat >"$OUT/summary.json" <<EOF
{
  "measured_utc": "$(date -u '+%Y-%m-%d %H:%M')",
  "machine": "$(nproc) vCPUs ($CPU), $MEM_GIB GiB RAM, kernel $(uname -r)",
  "dinomo": "$DINOMO_REV",
  "command": "$CMD_SHOWN",
  "redis_benchmark": "$(redis-benchmark --version | awk '{ print $2 }')",
  "requests": $N,
  "keyspace": $KEYSPACE,
  "value_size": $DATASIZE,
  "key_size": $KEYLEN,
  "shards": $SHARDS,
  "region_size": "$REGION",
  "region_fs": "$(stat -f -c %T "$DIR")",
  "bench_seconds": $BENCH_S,
  "set_per_second": ${RPS:-null},
  "puts_counted": $PUTS,
  "quiet_idle": $QUIET_IDLE,
  "quiet_loaded": $QUIET_LOADED,
  "budget_bytes": $BUDGET,
  "info_budget_bytes": ${M[loaded,cache_budget_bytes]},
  "idle_rss_anon_bytes": $ANON_IDLE,
  "loaded_rss_anon_bytes": $ANON_LOADED,
  "peak_rss_anon_bytes": $((PEAK * 1024)),
  "rss_anon_growth_bytes": $GROWTH,
  "growth_over_budget": $(div "$GROWTH" "$BUDGET"),
  "rss_anon_over_budget": $(div "$ANON_LOADED" "$BUDGET"),
  "idle_rss_file_bytes": $((M[idle,RssFile] * 1024)),
  "loaded_rss_file_bytes": $((M[loaded,RssFile] * 1024)),
  "idle_rss_shmem_bytes": $((M[idle,RssShmem] * 1024)),
  "loaded_rss_shmem_bytes": $((M[loaded,RssShmem] * 1024)),
  "idle_vm_hwm_bytes": $((M[idle,VmHWM] * 1024)),
  "loaded_vm_hwm_bytes": $((M[loaded,VmHWM] * 1024)),
  "keys": ${M[loaded,keys]},
  "cache_values": ${M[loaded,cache_values]},
  "cache_shortcuts": ${M[loaded,cache_shortcuts]},
  "cache_value_bytes": ${M[loaded,cache_value_bytes]},
  "cache_shortcut_bytes": ${M[loaded,cache_shortcut_bytes]},
  "charged_bytes": $CHARGED,
  "charged_bytes_per_cached_key": $(div "$CHARGED" "$CACHED" 1),
  "growth_bytes_per_cached_key": $(div "$GROWTH" "$CACHED" 1),
  "growth_bytes_per_key": $(div "$GROWTH" "${M[loaded,keys]}" 1),
  "growth_over_charged": $(div "$GROWTH" "$CHARGED")
}
EOF
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
    echo "KN memory after redis-benchmark -t set (measured $(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo "machine:     $(nproc) vCPUs ($CPU), $MEM_GIB GiB RAM"
    echo "dinomo:      $DINOMO_REV"
    echo "cluster:     dinomo up, 1 KN x $SHARDS shard(s), cache $CACHE, region $REGION ($(stat -f -c %T "$DIR")), shm fabric"
    echo "command:     $CMD_SHOWN"
    echo "run:         $BENCH_S s, ${RPS:-?} SET/s, $PUTS puts counted; KN quiet at idle: $QUIET_IDLE, after: $QUIET_LOADED"
    echo "budget:      $BUDGET B ($(mib "$BUDGET"))"
    echo "RssAnon:     idle $(mib "$ANON_IDLE"), loaded $(mib "$ANON_LOADED"), growth $(mib "$GROWTH"), peak during the run $(mib $((PEAK * 1024)))"
    echo "ratios:      growth/budget $(div "$GROWTH" "$BUDGET" 2), RssAnon/budget $(div "$ANON_LOADED" "$BUDGET" 2), growth/charged $(div "$GROWTH" "$CHARGED" 2)"
    echo "other:       RssFile $(mib $((M[loaded,RssFile] * 1024))), RssShmem $(mib $((M[loaded,RssShmem] * 1024))), VmHWM $(mib $((M[loaded,VmHWM] * 1024)))"
    echo "cache:       ${M[loaded,keys]} keys; ${M[loaded,cache_values]} values ($(mib "${M[loaded,cache_value_bytes]}") charged), ${M[loaded,cache_shortcuts]} shortcuts ($(mib "${M[loaded,cache_shortcut_bytes]}") charged), charged $CHARGED B"
    echo "per key:     charged $(div "$CHARGED" "$CACHED" 1) B per cached key; RssAnon growth $(div "$GROWTH" "$CACHED" 1) B per cached key, $(div "$GROWTH" "${M[loaded,keys]}" 1) B per key"
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
echo "results: $OUT"
if ((FAILED)); then
    echo "kn-memory: a check failed" >&2
    exit 1
fi
