#!/usr/bin/env bash
# redis-benchmark against redis-server and against a DINOMO cluster, one after the other, in
# one run on one machine; prints requests/s and the DINOMO/redis ratio for SET and GET at -P 1
# and -P 16, with the machine and the load average during the run.
#
#   scripts/kn-vs-redis.sh [OPTIONS]            # 1 KN, 1 shard
#   scripts/kn-vs-redis.sh --kns 2 --shards 2   # 2 KNs of 2 shards (redis-benchmark --cluster)
#
# See --help for the options. Exit status: 0 when every run completed and was checked (the
# ratios are reported, not enforced), 1 when a run or a check failed, 2 on bad usage or a
# missing tool.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/kn-vs-redis.sh [OPTIONS]

Runs, one after the other on this machine,
  redis-benchmark -t set,get -n N -r 100000 -d 64 -c C -P {1,16} --csv
against
  (a) redis-server (one process) with appendonly yes, appendfsync always, no RDB snapshots,
      its dir on the same file system as the DINOMO region, bound to 127.0.0.1 with a
      password (protected-mode yes) on a free port, and
  (b) a DINOMO cluster started with `dinomo up` (shm fabric, on free loopback ports, a fresh
      region, authentication on), KNS KNs of SHARDS shards each; with more than one KN
      redis-benchmark runs with --cluster.
Every run is checked: redis-benchmark's exit status (it exits on an error reply other than
MOVED/ASK), the servers' counters (redis: INFO commandstats calls and error replies; KN:
INFO gets/puts, which must have moved by at least N, and wrong_owner, which must not move)
and, without --cluster, 1000 keys read back after the runs (each present one must hold the
64-byte value the benchmark wrote).

Options:
  -n, --requests N     requests per test (default 200000)
  -c, --clients N      redis-benchmark connections (default 50)
      --kns N          KNs in the DINOMO cluster (default 1)
      --shards N       shards (shard threads) per KN, `dinomo up --threads` (default 1)
      --io-threads N   connection threads per KN, TOML io_threads (default 1)
      --cache SIZE     cache per KN (default 256M)
      --region-size S  region size (default 1G)
      --rounds N       run both servers N times, each time afresh (new AOF, new region),
                       odd rounds redis first, even rounds DINOMO first; the table holds the
                       medians and every round's ratio (default 1)
      --bin PATH       the dinomo binary, a release build
                       (default: $CARGO_TARGET_DIR/release/dinomo, else target/release/dinomo)
      --base DIR       folder under which the region's and redis's folders are made, on one
                       file system (default: /dev/shm, where `dinomo up` puts its region by
                       default; else $TMPDIR or /tmp)
      --out DIR        results folder: raw CSV, logs, counters, load samples and table.md
                       (default: ${TMPDIR:-/tmp}/kn-vs-redis.<UTC time>)
  -h, --help           this text

Example (quick): scripts/kn-vs-redis.sh -n 20000 --out /tmp/kvr
EOF
}

die() { echo "kn-vs-redis: $*" >&2; exit 2; }
fail() { echo "kn-vs-redis: FAILED: $*" >&2; FAILED=1; }

cd "$(dirname "$0")/.." || exit 2
N=200000
CLIENTS=50
KNS=1
SHARDS=1
IO_THREADS=1
CACHE=256M
REGION=1G
KEYSPACE=100000
DATASIZE=64
PIPELINES=(1 16)
ROUNDS=1
BIN=${CARGO_TARGET_DIR:-target}/release/dinomo
if [[ -d /dev/shm ]]; then BASE=/dev/shm; else BASE=${TMPDIR:-/tmp}; fi
OUT=

need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    -n | --requests) need "$@"; N=$2; shift 2 ;;
    -c | --clients) need "$@"; CLIENTS=$2; shift 2 ;;
    --kns) need "$@"; KNS=$2; shift 2 ;;
    --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
    --shards) need "$@"; SHARDS=$2; shift 2 ;;
    --io-threads) need "$@"; IO_THREADS=$2; shift 2 ;;
    --cache) need "$@"; CACHE=$2; shift 2 ;;
    --region-size) need "$@"; REGION=$2; shift 2 ;;
    --bin) need "$@"; BIN=$2; shift 2 ;;
    --base) need "$@"; BASE=$2; shift 2 ;;
    --out) need "$@"; OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "kn-vs-redis: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for v in N CLIENTS KNS SHARDS IO_THREADS ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $CACHE =~ ^[0-9]+[KMGkmg]?$ ]] || die "--cache must be a size such as 256M (got '$CACHE')"
[[ $REGION =~ ^[0-9]+[KMGkmg]?$ ]] || die "--region-size must be a size such as 1G (got '$REGION')"

# Tools.
declare -A PKG=([redis-server]=redis-server [redis-cli]=redis-tools [redis-benchmark]=redis-tools
    [awk]=gawk [od]=coreutils [stat]=coreutils [df]=coreutils [timeout]=coreutils [ps]=procps)
for t in redis-server redis-cli redis-benchmark awk od stat df timeout ps; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install ${PKG[$t]})"
done
[[ -x $BIN ]] || die "$BIN is not an executable: build it (cargo build --release --bin dinomo) or give --bin"
[[ $BIN == */release/* ]] ||
    echo "kn-vs-redis: warning: $BIN is not under a release/ folder; the figures are meant for a release build" >&2
[[ -d $BASE && -w $BASE ]] || die "--base $BASE is not a writable folder"
CLUSTER=()
((KNS > 1)) && CLUSTER=(--cluster)

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-${TMPDIR:-/tmp}/kn-vs-redis.$STAMP}
mkdir -p "$OUT" || die "cannot make the results folder $OUT"
OUT=$(cd "$OUT" && pwd)

# shellcheck source=scripts/proc-lib.sh
. scripts/proc-lib.sh

# State for the cleanup.
FAILED=0
WORK=
REDIS_PID=
UP_PID=
UP_TREE=()
BENCH_PID=
SAMPLER_PID=

# Waits up to $2 seconds for pid $1 to exit; 0 when it did.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

REDIS_EXE=$(readlink -f "$(command -v redis-server)")
BIN_EXE=$(readlink -f "$BIN")

stop_redis() {
    [[ -n $REDIS_PID ]] || return 0
    if alive_as "$REDIS_PID" "$REDIS_EXE"; then
        kill -TERM "$REDIS_PID" 2>/dev/null
        if ! wait_gone "$REDIS_PID" 30; then
            echo "kn-vs-redis: redis-server $REDIS_PID did not stop in 30 s; killing it" >&2
            kill -KILL "$REDIS_PID" 2>/dev/null
        fi
    fi
    wait "$REDIS_PID" 2>/dev/null
    REDIS_PID=
}

# `dinomo up` stops its cluster in order on SIGTERM; its children run in their own process
# groups, so any that outlive it (it was killed, or a child hung) are killed one by one.
stop_dinomo() {
    local rc=0 p
    [[ -n $UP_PID ]] || return 0
    if kill -0 "$UP_PID" 2>/dev/null; then
        kill -TERM "$UP_PID" 2>/dev/null
        if ! wait_gone "$UP_PID" 150; then
            echo "kn-vs-redis: dinomo up $UP_PID did not stop in 150 s; killing it" >&2
            kill -KILL "$UP_PID" 2>/dev/null
        fi
    fi
    wait "$UP_PID" 2>/dev/null
    rc=$?
    for p in "${UP_TREE[@]}"; do
        if alive_as "$p" "$BIN_EXE"; then
            echo "kn-vs-redis: killing leftover dinomo process $p" >&2
            kill -KILL "$p" 2>/dev/null
        fi
    done
    UP_PID=
    UP_TREE=()
    return "$rc"
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    [[ -n $BENCH_PID ]] && kill -TERM "$BENCH_PID" 2>/dev/null
    [[ -n $SAMPLER_PID ]] && kill -TERM "$SAMPLER_PID" 2>/dev/null
    stop_redis
    stop_dinomo
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'echo "kn-vs-redis: interrupted" >&2; exit 1' INT TERM HUP

# A first port such that it and the $1 - 1 after it have no TCP socket on them.
# Load average, every second, tagged with the phase the script is in.
PHASE_FILE=
sampler() {
    local ph
    while :; do
        ph=$(cat "$PHASE_FILE" 2>/dev/null)
        echo "$(date -u +%s) ${ph:-idle} $(cut -d' ' -f1-4 /proc/loadavg)"
        sleep 1
    done
}
phase() { echo "$1" >"$PHASE_FILE"; }

# calls= / failed_calls= / rejected_calls= of cmdstat_$2 in $1.
cmdstat() {
    awk -v c="cmdstat_$2:" -v f="$3" 'index($0, c) == 1 {
        n = split(substr($0, length(c) + 1), kv, ",")
        for (i = 1; i <= n; i++) { split(kv[i], p, "="); gsub("\r", "", p[2]); if (p[1] == f) v = p[2] }
    } END { print v + 0 }' <<<"$1"
}

# redis-cli with the password kept out of the process list.
rcli() {
    local port=$1 pass=$2
    shift 2
    REDISCLI_AUTH=$pass timeout 20 redis-cli --no-auth-warning -h 127.0.0.1 -p "$port" "$@"
}

# Requests/s of test $2 (SET or GET) in the CSV $1.
rps() { awk -F, -v t="\"$2\"" '$1 == t { gsub("\"", "", $2); print $2 }' "$1"; }

declare -A RESULT
# Server CPU per request: the CPU time (user + system, from /proc/PID/stat) of the server
# processes in CPU_PIDS during a run, over its 2N requests; for DINOMO the KNs' (the memory
# node's, in MEM_PIDS, is kept apart: it is another host in a deployment). Unlike requests/s,
# this hardly depends on what else the machine runs.
declare -A CPU MEMCPU
CPU_PIDS=()
MEM_PIDS=()
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local p s=0 t
    for p in "$@"; do
        t=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null) || t=0
        s=$((s + ${t:-0}))
    done
    echo "$s"
}
us_per_request() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$N" 'BEGIN { printf "%.2f", t / hz * 1e6 / (2 * n) }'; }
# run_bench SYSTEM PORT PASS PIPELINE: one redis-benchmark run, its CSV kept in $OUT.
run_bench() {
    local sys=$1 port=$2 pass=$3 p=$4 csv err rc t v
    csv=$OUT/r$ROUND-$sys-P$p.csv
    err=$OUT/r$ROUND-$sys-P$p.stderr
    local cmd=(redis-benchmark -h 127.0.0.1 -p "$port" -a "$pass" "${EXTRA[@]}"
        -t set,get -n "$N" -r "$KEYSPACE" -d "$DATASIZE" -c "$CLIENTS" -P "$p" --csv)
    echo "${cmd[*]}" | sed "s/-a [^ ]*/-a PASSWORD/" >"$OUT/r$ROUND-$sys-P$p.cmd"
    ps -eo pid,pcpu,rss,comm --sort=-pcpu | head -12 >"$OUT/r$ROUND-$sys-P$p.ps-before"
    phase "r$ROUND-$sys-P$p"
    local cpu0 mem0
    cpu0=$(cpu_ticks "${CPU_PIDS[@]}")
    mem0=$(cpu_ticks "${MEM_PIDS[@]}")
    "${cmd[@]}" >"$csv" 2>"$err" &
    BENCH_PID=$!
    wait "$BENCH_PID"
    rc=$?
    BENCH_PID=
    CPU[$sys,$p,$ROUND]=$(us_per_request $(($(cpu_ticks "${CPU_PIDS[@]}") - cpu0)))
    MEMCPU[$sys,$p,$ROUND]=$(us_per_request $(($(cpu_ticks "${MEM_PIDS[@]}") - mem0)))
    phase idle
    if ((rc != 0)); then
        fail "redis-benchmark against $sys at -P $p exited with $rc: $(tr '\n' ' ' <"$err" | cut -c1-400)"
        return 1
    fi
    if grep -qi "error" "$err" "$csv"; then
        fail "redis-benchmark against $sys at -P $p printed errors: $(grep -hi error "$err" "$csv" | head -3 | tr '\n' ' ')"
        return 1
    fi
    for t in SET GET; do
        v=$(rps "$csv" "$t")
        if ! [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || awk -v x="$v" 'BEGIN { exit !(x <= 0) }'; then
            fail "no requests/s for $t in $csv"
            return 1
        fi
        RESULT[$sys,$t,$p,$ROUND]=$v
    done
    echo "  $sys -P $p: SET ${RESULT[$sys,SET,$p,$ROUND]}/s, GET ${RESULT[$sys,GET,$p,$ROUND]}/s; server CPU ${CPU[$sys,$p,$ROUND]} us/request"
}

# Commands a run must have executed: redis-benchmark issues whole pipelines, ceil(N/P)*P.
expect_max() { echo $(((N + $1 - 1) / $1 * $1)); }

# check_count SYSTEM PIPELINE WHAT DELTA: at least N and at most whole pipelines of WHAT.
check_count() {
    local sys=$1 p=$2 what=$3 d=$4 max
    max=$(expect_max "$p")
    if ((d < N || d > max)); then
        fail "$sys at -P $p: the server counted $d $what, expected $N..$max"
        return 1
    fi
    echo "    $what counted by the server: $d (sent: $N..$max)"
}

# readback SYSTEM PORT PASS SETS: GET 1000 keys of the benchmark's key space. Each present
# one must hold the benchmark's value (redis-benchmark writes one pseudo-random value of -d
# bytes, the same in every run: what redis holds is what the KNs must hold), and the number
# present must be near what SETS uniformly random SETs leave.
VALUE=
readback() {
    local sys=$1 port=$2 pass=$3 sets=$4 out good nil bad k=1000 v lines
    # A file, not $(...): that would drop the empty lines (nil) at the end.
    out=$OUT/r$ROUND-$sys.readback
    for ((i = 0; i < k; i++)); do printf 'GET key:%012d\n' "$i"; done | rcli "$port" "$pass" >"$out"
    lines=$(wc -l <"$out")
    if ((lines != k)); then
        fail "$sys: $lines replies to $k GETs (see $out)"
        return 1
    fi
    v=$(awk -v d="$DATASIZE" 'length($0) == d { print; exit }' "$out")
    if [[ -z $VALUE ]]; then
        VALUE=$v
    elif [[ -n $v && $v != "$VALUE" ]]; then
        fail "$sys holds the value '$v' where the other server holds '$VALUE'"
        return 1
    fi
    good=0
    [[ -n $v ]] && good=$(grep -cxF -- "$v" "$out")
    nil=$(grep -cx -- "" "$out")
    bad=$((k - good - nil))
    echo "round $ROUND, $sys: $good of $k sampled keys hold the benchmark's value '$v', $nil absent, $bad other" >>"$OUT/checks.txt"
    if ((bad != 0)); then
        fail "$sys: $bad of $k sampled keys answered neither the benchmark's value nor nil: $(grep -vxF -e "$v" -e "" "$out" | head -3 | tr '\n' ' ')"
        return 1
    fi
    # Expected present: k * (1 - (1 - 1/K)^sets); accept down to 5 standard deviations below.
    if ! awk -v k="$k" -v K="$KEYSPACE" -v s="$sets" -v g="$good" 'BEGIN {
        p = 1 - exp(s * log(1 - 1 / K)); m = k * p; sd = sqrt(k * p * (1 - p))
        exit !(g >= m - 5 * sd - 1) }'; then
        fail "$sys: only $good of $k sampled keys are present after $sets random SETs over $KEYSPACE keys"
        return 1
    fi
    echo "    read back: $good of $k sampled keys present, each with the benchmark's $DATASIZE-byte value"
}

# Machine.
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
NPROC=$(nproc)
KERNEL=$(uname -r)
REDIS_VERSION=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
BENCH_VERSION=$(redis-benchmark --version | awk '{ print $2 }')
DINOMO_REV=$(dinomo_build "$BIN")

WORK=$(mktemp -d "$BASE/kn-vs-redis.XXXXXX") || die "cannot make a folder under $BASE"
PHASE_FILE=$WORK/phase
FS_TYPE=$(stat -f -c %T "$WORK")
FS_MOUNT=$(df --output=target "$WORK" | tail -1)

echo "kn-vs-redis: $NPROC CPUs ($CPU), kernel $KERNEL; redis-server $REDIS_VERSION, redis-benchmark $BENCH_VERSION; dinomo $BIN ($DINOMO_REV)"
echo "kn-vs-redis: data under $WORK ($FS_TYPE, mounted at $FS_MOUNT); results in $OUT"
sampler >"$OUT/loadavg.txt" &
SAMPLER_PID=$!

# ---- (a) redis-server ----------------------------------------------------------------------
run_redis() {
local dir=$WORK/r$ROUND/redis
mkdir -p -m 700 "$dir"
[[ $(stat -c %d "$dir") == $(stat -c %d "$WORK") ]] || { fail "$dir is not on the file system of $WORK"; exit 1; }
RPORT=$(free_ports 1) || { fail "found no free port"; exit 1; }
RPASS=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
(
    umask 077
    cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
port $RPORT
protected-mode yes
requirepass $RPASS
daemonize no
dir $dir
logfile $dir/redis.log
appendonly yes
appendfsync always
save ""
EOF
)
phase redis-start
redis-server "$dir/redis.conf" &
REDIS_PID=$!
for ((i = 0; i < 200; i++)); do
    [[ $(rcli "$RPORT" "$RPASS" PING 2>/dev/null) == PONG ]] && break
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ $(rcli "$RPORT" "$RPASS" PING 2>/dev/null) != PONG ]]; then
    cp "$dir/redis.log" "$OUT/r$ROUND-redis.log" 2>/dev/null
    fail "redis-server did not answer PING on 127.0.0.1:$RPORT (log: $OUT/r$ROUND-redis.log)"
    exit 1
fi
AOF=$(rcli "$RPORT" "$RPASS" CONFIG GET appendonly | tail -1)/$(rcli "$RPORT" "$RPASS" CONFIG GET appendfsync | tail -1)
[[ $AOF == yes/always ]] || { fail "redis-server runs with appendonly/appendfsync = $AOF"; exit 1; }
echo "redis-server $REDIS_VERSION on 127.0.0.1:$RPORT (pid $REDIS_PID), appendonly yes, appendfsync always, dir $dir"
EXTRA=()
CPU_PIDS=("$REDIS_PID")
MEM_PIDS=()
REDIS_SETS=0
for p in "${PIPELINES[@]}"; do
    before=$(rcli "$RPORT" "$RPASS" INFO all)
    run_bench redis "$RPORT" "$RPASS" "$p" || continue
    after=$(rcli "$RPORT" "$RPASS" INFO all)
    printf '%s\n---\n%s\n' "$before" "$after" >"$OUT/r$ROUND-redis-P$p.info"
    for c in set get; do
        d=$(($(cmdstat "$after" "$c" calls) - $(cmdstat "$before" "$c" calls)))
        check_count redis "$p" "${c^^} calls" "$d"
        [[ $c == set ]] && REDIS_SETS=$((REDIS_SETS + d))
        for f in failed_calls rejected_calls; do
            d=$(($(cmdstat "$after" "$c" "$f") - $(cmdstat "$before" "$c" "$f")))
            ((d == 0)) || fail "redis at -P $p: $d ${c^^} $f"
        done
    done
    d=$(($(info_field "$after" total_error_replies) - $(info_field "$before" total_error_replies)))
    ((d == 0)) || fail "redis at -P $p: $d error replies"
done
readback redis "$RPORT" "$RPASS" "$REDIS_SETS"
AOF_BYTES=$(du -sb "$dir" | awk '{ print $1 }')
echo "    redis's folder holds $AOF_BYTES bytes (AOF) after the runs"
phase redis-stop
stop_redis
cp "$dir/redis.log" "$OUT/r$ROUND-redis.log" 2>/dev/null
}

# ---- (b) DINOMO ----------------------------------------------------------------------------
# Sums field $1 of INFO over the KNs.
kn_sum() {
    local k s=0 v
    for ((k = 0; k < KNS; k++)); do
        v=$(info_field "$(rcli $((KPORT + k)) "$KPASS" INFO dinomo)" "$1")
        s=$((s + v))
    done
    echo "$s"
}
run_dinomo() {
local dir=$WORK/r$ROUND
mkdir -p -m 700 "$dir"
MPORT=$(free_ports $((KNS + 1))) || { fail "found no free ports"; exit 1; }
KPORT=$((MPORT + 1))
cat >"$dir/up.toml" <<EOF
kns = $KNS
dir = "$dir/dinomo"
region_size = "$REGION"
fresh = true
host = "127.0.0.1"
manager_port = $MPORT
base_port = $KPORT
threads = $SHARDS
io_threads = $IO_THREADS
cache = "$CACHE"
auth = true
EOF
cp "$dir/up.toml" "$OUT/r$ROUND-up.toml"
phase dinomo-start
: >"$OUT/r$ROUND-dinomo-up.log"
"$BIN" up --config "$dir/up.toml" >"$OUT/r$ROUND-dinomo-up.log" 2>&1 &
UP_PID=$!
for ((i = 0; i < 1200; i++)); do
    grep -q "^cluster up:" "$OUT/r$ROUND-dinomo-up.log" && break
    kill -0 "$UP_PID" 2>/dev/null || break
    sleep 0.1
done
if ! grep -q "^cluster up:" "$OUT/r$ROUND-dinomo-up.log"; then
    fail "dinomo up did not bring the cluster up in 120 s: $(tail -5 "$OUT/r$ROUND-dinomo-up.log" | tr '\n' ' ')"
    exit 1
fi
mapfile -t UP_TREE < <(descendants "$UP_PID")
KPASS=$(cat "$dir/dinomo/requirepass") || { fail "no password file in $dir/dinomo"; exit 1; }
REGION_FILE=$(sed -n 's/^cluster up:.*region \([^)]*\)).*/\1/p' "$OUT/r$ROUND-dinomo-up.log" | head -1)
if [[ $(stat -c %d "$REGION_FILE") != $(stat -c %d "$WORK") ]]; then
    fail "the region $REGION_FILE is not on the file system of $WORK, where redis's AOF is"
fi
echo "dinomo up: $KNS KN(s) x $SHARDS shard(s), $IO_THREADS connection thread(s), cache $CACHE, KNs at 127.0.0.1:$KPORT.., region $REGION_FILE ($FS_TYPE, same file system as redis's AOF); processes ${UP_TREE[*]}"
for ((k = 0; k < KNS; k++)); do
    rcli $((KPORT + k)) "$KPASS" CLUSTER NODES >"$OUT/r$ROUND-dinomo-kn$k.cluster-nodes" 2>&1
    rcli $((KPORT + k)) "$KPASS" CLUSTER SLOTS >"$OUT/r$ROUND-dinomo-kn$k.cluster-slots" 2>&1
done
EXTRA=("${CLUSTER[@]}")
CPU_PIDS=()
MEM_PIDS=()
for pid in "${UP_TREE[@]}"; do
    case " $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) " in
    *" kn "*) CPU_PIDS+=("$pid") ;;
    *" dpm serve "*) MEM_PIDS+=("$pid") ;;
    esac
done
((${#CPU_PIDS[@]} == KNS)) || fail "found ${#CPU_PIDS[@]} KN processes under dinomo up, not $KNS"
KN_SETS=0
for p in "${PIPELINES[@]}"; do
    declare -A B=()
    for f in gets puts wrong_owner; do B[$f]=$(kn_sum "$f"); done
    run_bench dinomo "$KPORT" "$KPASS" "$p" || continue
    for ((k = 0; k < KNS; k++)); do
        rcli $((KPORT + k)) "$KPASS" INFO server clients memory stats dinomo >>"$OUT/r$ROUND-dinomo-P$p.info"
    done
    gets=$(($(kn_sum gets) - B[gets]))
    puts=$(($(kn_sum puts) - B[puts]))
    wrong=$(($(kn_sum wrong_owner) - B[wrong_owner]))
    check_count dinomo "$p" "SETs (puts)" "$puts"
    check_count dinomo "$p" "GETs (gets)" "$gets"
    KN_SETS=$((KN_SETS + puts))
    ((wrong == 0)) || fail "dinomo at -P $p: $wrong requests reached a KN that does not own their key (MOVED)"
done
if ((KNS == 1)); then
    readback dinomo "$KPORT" "$KPASS" "$KN_SETS"
else
    echo "    (no read-back with --cluster: redis-benchmark's keys then carry per-node hash tags)"
fi
phase dinomo-stop
if ! stop_dinomo; then
    fail "dinomo up did not stop cleanly (see $OUT/r$ROUND-dinomo-up.log)"
fi
grep -q "cluster stopped cleanly" "$OUT/r$ROUND-dinomo-up.log" || fail "dinomo up did not report a clean stop"
}


for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    ((ROUNDS > 1)) && echo "-- round $ROUND of $ROUNDS"
    if ((ROUND % 2)); then
        run_redis
        run_dinomo
    else
        run_dinomo
        run_redis
    fi
    rm -rf "${WORK:?}/r$ROUND"
done
kill -TERM "$SAMPLER_PID" 2>/dev/null
wait "$SAMPLER_PID" 2>/dev/null
SAMPLER_PID=

# ---- table -----------------------------------------------------------------------------------
LOAD=$(awk '$2 ~ /-P/ { n++; s += $3; if (n == 1 || $3 < lo) lo = $3; if ($3 > hi) hi = $3 }
    END { if (n) printf "min %.2f, mean %.2f, max %.2f over %d one-second samples taken while redis-benchmark ran", lo, s / n, hi, n; else print "no samples" }' "$OUT/loadavg.txt")
LOAD_ALL=$(awk 'NR == 1 { first = $3 } { last = $3 } END { printf "%s at the start, %s at the end of the run", first, last }' "$OUT/loadavg.txt")
fmt() { awk -v x="$1" 'BEGIN { if (x == "") print "-"; else printf "%\047.0f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
# Median over the rounds of CPU[$1,$2,round] (or of the array named by $3).
cpu_median() {
    local -n arr=${3:-CPU}
    local r
    for ((r = 1; r <= ROUNDS; r++)); do
        [[ -n ${arr[$1,$2,$r]:-} ]] && echo "${arr[$1,$2,$r]}"
    done | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
# Median over the rounds of RESULT[$1,$2,$3,round] (empty when no round has it).
median() {
    local r
    for ((r = 1; r <= ROUNDS; r++)); do
        [[ -n ${RESULT[$1,$2,$3,$r]:-} ]] && echo "${RESULT[$1,$2,$3,$r]}"
    done | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
if ((KNS > 1)); then RUNS="redis-benchmark ... --cluster against DINOMO"; else RUNS="the same command against both"; fi
{
    echo "# redis-benchmark: redis-server vs DINOMO"
    echo
    echo "- measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname): nproc $NPROC, CPU $CPU, kernel $KERNEL"
    echo "- load average (1 min, /proc/loadavg): $LOAD; $LOAD_ALL (each run's client and server alone make about 2)"
    echo "- command: redis-benchmark -t set,get -n $N -r $KEYSPACE -d $DATASIZE -c $CLIENTS -P {1,16} --csv (redis-benchmark $BENCH_VERSION; $RUNS), one server after the other"
    echo "- redis-server $REDIS_VERSION: one process, appendonly yes, appendfsync always, save \"\", password, 127.0.0.1"
    echo "- DINOMO $DINOMO_REV: dinomo up, $KNS KN(s) x $SHARDS shard(s), io_threads $IO_THREADS, cache $CACHE per KN, region $REGION, shm fabric, password, 127.0.0.1"
    echo "- region and AOF on one file system: $FS_TYPE at $FS_MOUNT"
    if ((ROUNDS > 1)); then
        echo "- $ROUNDS rounds (odd ones redis first, even ones DINOMO first), each with a fresh AOF and region; medians of the rounds, ratio of the medians, per-round ratios in the last column"
    fi
    echo
    if ((ROUNDS > 1)); then
        echo "| requests/s | redis-server | DINOMO ($KNS KN x $SHARDS shard) | DINOMO/redis | per round |"
        echo "|---|---:|---:|---:|---|"
    else
        echo "| requests/s | redis-server | DINOMO ($KNS KN x $SHARDS shard) | DINOMO/redis |"
        echo "|---|---:|---:|---:|"
    fi
    for p in "${PIPELINES[@]}"; do
        for t in SET GET; do
            if ((p == 1)); then label="$t, no pipelining"; else label="$t, \`-P $p\`"; fi
            r=$(median redis "$t" "$p")
            d=$(median dinomo "$t" "$p")
            line="| $label | $(fmt "$r") | $(fmt "$d") | $(ratio "$d" "$r") |"
            if ((ROUNDS > 1)); then
                per=()
                for ((k = 1; k <= ROUNDS; k++)); do
                    per+=("$(ratio "${RESULT[dinomo,$t,$p,$k]:-}" "${RESULT[redis,$t,$p,$k]:-}")")
                done
                line="$line ${per[*]} |"
            fi
            echo "$line"
        done
    done
    echo
    echo "Server CPU per request (user + system CPU time of the server processes during the run, over its SETs and GETs; median of the rounds; redis/KN above 1 means the KN spends less CPU per request; the memory node's is apart, it is another host in a deployment):"
    echo
    echo "| CPU us/request (SET+GET) | redis-server | DINOMO KN(s) | redis/KN | DINOMO memory node |"
    echo "|---|---:|---:|---:|---:|"
    for p in "${PIPELINES[@]}"; do
        if ((p == 1)); then label="no pipelining"; else label="\`-P $p\`"; fi
        r=$(cpu_median redis "$p")
        d=$(cpu_median dinomo "$p")
        m=$(cpu_median dinomo "$p" MEMCPU)
        echo "| $label | $r | $d | $(ratio "$r" "$d") | $m |"
    done
    if ((FAILED)); then
        echo
        echo "**A run or a check failed: see the messages of the script.**"
    fi
} >"$OUT/table.md"
{
    echo "round,test,pipeline,redis_rps,dinomo_rps,ratio"
    for ((k = 1; k <= ROUNDS; k++)); do
        for p in "${PIPELINES[@]}"; do
            for t in SET GET; do
                r=${RESULT[redis,$t,$p,$k]:-}
                d=${RESULT[dinomo,$t,$p,$k]:-}
                echo "$k,$t,$p,$r,$d,$(ratio "$d" "$r" | tr -d x)"
            done
        done
    done
    for p in "${PIPELINES[@]}"; do
        for t in SET GET; do
            r=$(median redis "$t" "$p")
            d=$(median dinomo "$t" "$p")
            echo "median,$t,$p,$r,$d,$(ratio "$d" "$r" | tr -d x)"
        done
    done
} >"$OUT/summary.csv"
echo
cat "$OUT/table.md"
echo
echo "results: $OUT"
if ((FAILED)); then
    echo "kn-vs-redis: at least one run or check failed" >&2
    exit 1
fi
exit 0
