#!/usr/bin/env bash
# `dinomo fabric-bench --fabric verbs` beside perftest on the same RDMA device, in one run.
#
#   scripts/rxe-vm --timeout 900 -- scripts/verbs-vs-perftest.sh [BIN]
#
# Runs on a host (or VM) with an RDMA device: soft-RoCE in the project's VM harness, or a
# real NIC. BIN is a `dinomo` built with `--features rdma` (default: target/release/dinomo).
# Device and GID index: DINOMO_RDMA_DEVICE (default rxe0) and DINOMO_RDMA_GID_INDEX
# (default: dinomo chooses, and perftest gets the port's RoCE v2 IPv4 entry from sysfs).
#
# Both sides run the same way perftest's loopback does: server and client on the same
# device, one RC queue pair, one request outstanding for latency.
#   READ 64 B, READ 1 KiB   vs ib_read_lat   -s 64 / -s 1024
#   CAS, FAA                vs ib_atomic_lat -A CMP_AND_SWAP / FETCH_AND_ADD
#   WRITE 64 KiB bandwidth  vs ib_write_bw   -s 65536 -t DEPTH (both DEPTH deep)
# Latency: our p50 (post to completion) against perftest's t_typical (its median).
# Bandwidth: payload Gb/s (10^9 bit/s) against perftest's BW average (--report_gbits).
# Each round runs every test on both sides, the order of the two sides alternating from
# round to round, so that drift of an emulated machine falls on both alike; the table has
# the median over rounds of each side, and the median of the per-round ratios.
#
# Environment: ROUNDS (5), ITERS (5000, latency), BW_ITERS (2000), DEPTH (128),
# BASE_PORT (18600). Exit status 0 when every run completed (the goals are reported,
# not enforced), 1 when a run failed, 2 on bad usage.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${1:-target/release/dinomo}
DEV=${DINOMO_RDMA_DEVICE:-rxe0}
GID=${DINOMO_RDMA_GID_INDEX:-}
ROUNDS=${ROUNDS:-5}
ITERS=${ITERS:-5000}
BW_ITERS=${BW_ITERS:-2000}
DEPTH=${DEPTH:-128}
PORT=${BASE_PORT:-18600}
LAT_GOAL=1.10
BW_GOAL=0.90

die() { echo "verbs-vs-perftest: $*" >&2; exit 2; }
[[ -x $BIN ]] || die "$BIN is not an executable (build it: cargo build --release --bin dinomo --features rdma)"
for t in ib_read_lat ib_atomic_lat ib_write_bw; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install perftest)"
done
[[ -d /sys/class/infiniband/$DEV ]] ||
    die "no RDMA device $DEV (have: $(ls /sys/class/infiniband 2>/dev/null | tr '\n' ' '))"

# perftest needs an explicit GID index on RoCE: the given one, or the RoCE v2 entry of an
# IPv4 address (the rule dinomo applies when given none).
auto_gid() {
    local p=/sys/class/infiniband/$DEV/ports/1 f i
    for f in "$p"/gids/*; do
        i=${f##*/}
        [[ $(cat "$p/gid_attrs/types/$i" 2>/dev/null) == "RoCE v2" ]] || continue
        [[ $(cat "$f") == 0000:0000:0000:0000:0000:ffff:* ]] && { echo "$i"; return; }
    done
    echo 0
}
PT_GID=${GID:-$(auto_gid)}
OUR_GID=()
[[ -n $GID ]] && OUR_GID=(--gid-index "$GID")

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FAILED=0

# Waits until something listens on TCP port $1 (without connecting: a perftest server
# serves exactly one connection).
wait_listen() {
    local hex i
    hex=$(printf '%04X' "$1")
    for ((i = 0; i < 600; i++)); do
        if awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# perftest TOOL ARGS...: one loopback run; prints the server's and client's output.
perftest() {
    local tool=$1
    shift
    local common=(-d "$DEV" -i 1 -x "$PT_GID" -p "$PORT" "$@")
    "$tool" "${common[@]}" >"$OUT/srv" 2>&1 &
    local srv=$!
    if ! wait_listen "$PORT"; then
        kill "$srv" 2>/dev/null || true
        wait "$srv" 2>/dev/null || true
        echo "perftest server $tool did not listen" >&2
        cat "$OUT/srv" >&2
        return 1
    fi
    local rc=0
    "$tool" "${common[@]}" 127.0.0.1 >"$OUT/cli" 2>&1 || rc=$?
    wait "$srv" || rc=$((rc ? rc : $?))
    cat "$OUT/cli"
    return "$rc"
}

# Column COL of the first numeric row after the header line that contains WORD.
perftest_figure() {
    awk -v word="$1" -v col="$2" '
        index($0, word) { h = 1; next }
        h && $1 ~ /^[0-9]+$/ { print $col; exit }'
}

# ours ARGS...: one fabric-bench run; prints its table and leaves its JSON in $OUT/json.
ours() {
    "$BIN" fabric-bench --fabric verbs --device "$DEV" "${OUR_GID[@]}" \
        --region-size 16M --json "$OUT/json" "$@"
}

json_field() { sed -n "s/.*\"$1\": \\([0-9.e+-]*\\).*/\\1/p" "$OUT/json" | head -1; }

# run_pair NAME KIND PERFTEST-COMMAND... -- OURS-ARGS...: one round of one test, in the
# order given by $FIRST; appends "NAME ours theirs" to $OUT/results.
run_pair() {
    local name=$1 kind=$2
    shift 2
    local pt=() ob=()
    while [[ $1 != -- ]]; do pt+=("$1"); shift; done
    shift
    ob=("$@")
    local mine theirs log
    run_theirs() {
        PORT=$((PORT + 1))
        log=$(perftest "${pt[@]}") || { echo "$log" >&2; return 1; }
        echo "$log" >>"$OUT/raw"
        if [[ $kind == lat ]]; then
            theirs=$(perftest_figure t_typical 5 <<<"$log")
        else
            theirs=$(perftest_figure 'BW average' 4 <<<"$log")
        fi
        [[ -n $theirs ]] || { echo "no figure in the $name perftest output:" >&2; echo "$log" >&2; return 1; }
    }
    run_mine() {
        log=$(ours "${ob[@]}" 2>&1) || { echo "$log" >&2; return 1; }
        echo "$log" >>"$OUT/raw"
        if [[ $kind == lat ]]; then
            mine=$(awk -v ns="$(json_field p50_ns)" 'BEGIN { printf "%.3f", ns / 1000 }')
        else
            mine=$(json_field gbps)
        fi
        [[ -n $mine ]] || { echo "no figure in the $name fabric-bench output" >&2; return 1; }
    }
    echo "## round $ROUND, $name (${FIRST} first)" >>"$OUT/raw"
    if [[ $FIRST == perftest ]]; then
        run_theirs && run_mine || { FAILED=1; return 0; }
    else
        run_mine && run_theirs || { FAILED=1; return 0; }
    fi
    echo "$name $mine $theirs" >>"$OUT/results"
    printf '  round %d  %-13s dinomo %10s   perftest %10s\n' "$ROUND" "$name" "$mine" "$theirs"
}

echo "# verbs-vs-perftest $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "# device $DEV, perftest GID index $PT_GID, dinomo GID index ${GID:-auto}"
echo "# $(uname -sr); $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(nproc) CPUs;" \
    "hypervisor: $(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1)"
echo "# $("$BIN" --version 2>/dev/null || echo dinomo); $(ib_read_lat --version 2>&1 | head -1)"
echo "# rounds $ROUNDS, latency iterations $ITERS, bandwidth iterations $BW_ITERS, depth $DEPTH"
: >"$OUT/results"
: >"$OUT/raw"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    if ((ROUND % 2)); then FIRST=perftest; else FIRST=dinomo; fi
    warm=$((ITERS / 10))
    run_pair read_64 lat ib_read_lat -s 64 -n "$ITERS" -- \
        --op read --size 64 --depth 1 --iters "$ITERS" --warmup "$warm"
    run_pair read_1k lat ib_read_lat -s 1024 -n "$ITERS" -- \
        --op read --size 1024 --depth 1 --iters "$ITERS" --warmup "$warm"
    run_pair cas lat ib_atomic_lat -A CMP_AND_SWAP -n "$ITERS" -- \
        --op cas --depth 1 --iters "$ITERS" --warmup "$warm"
    run_pair faa lat ib_atomic_lat -A FETCH_AND_ADD -n "$ITERS" -- \
        --op faa --depth 1 --iters "$ITERS" --warmup "$warm"
    run_pair write_bw_64k bw ib_write_bw -s 65536 -t "$DEPTH" -n "$BW_ITERS" --report_gbits -- \
        --op write --size 64K --depth "$DEPTH" --iters "$BW_ITERS" --warmup "$((BW_ITERS / 10))"
done

echo
echo "# raw output of every run"
sed 's/^/  /' "$OUT/raw"
echo
echo "# medians over $ROUNDS rounds; ratio: the median of the rounds' ratios (each round's"
echo "# pair ran back to back, so that drift of the machine cancels in it)"
awk -v lg="$LAT_GOAL" -v bg="$BW_GOAL" '
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) {
            t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
        }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        if (!($1 in mine)) order[++k] = $1
        mine[$1] = mine[$1] " " $2; theirs[$1] = theirs[$1] " " $3
        ratio[$1] = ratio[$1] " " ($3 > 0 ? $2 / $3 : 0)
    }
    END {
        label["read_64"] = "READ 64 B"; label["read_1k"] = "READ 1 KiB"
        label["cas"] = "CAS"; label["faa"] = "FAA"; label["write_bw_64k"] = "WRITE 64 KiB"
        printf "| %-12s | %-20s | %-26s | %-6s | %-15s | %s\n", "test", "dinomo", "perftest", "ratio", "goal", "ratios per round"
        printf "|--------------|----------------------|----------------------------|--------|-----------------|------------------\n"
        for (i = 1; i <= k; i++) {
            t = order[i]; m = median(mine[t]); p = median(theirs[t]); r = median(ratio[t])
            n = split(ratio[t], rs, " "); per = ""
            for (j = 1; j <= n; j++) per = per sprintf("%s%.2f", j > 1 ? " " : "", rs[j])
            if (t ~ /bw/) {
                ok = r >= bg ? "met" : "missed"
                printf "| %-12s | %7.3f Gb/s          | %7.3f Gb/s BW average    | %6.3f | >= %.2f: %-6s | %s\n", label[t], m, p, r, bg, ok, per
            } else {
                ok = r <= lg ? "met" : "missed"
                printf "| %-12s | %7.2f us p50        | %7.2f us t_typical        | %6.3f | <= %.2f: %-6s | %s\n", label[t], m, p, r, lg, ok, per
            }
        }
    }' "$OUT/results"
if ((FAILED)); then
    echo "verbs-vs-perftest: some runs failed (see above)" >&2
    exit 1
fi
