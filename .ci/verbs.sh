#!/usr/bin/env bash
# CI stage: the verbs fabric on a real kernel verbs stack. The CI kernel has no RDMA, so
# everything here runs in the soft-RoCE VM of scripts/rxe-vm (rxe0, GID index 1), each run
# bounded in time:
#   * the device tests of dinomo-hw (ignored in a plain `cargo test`),
#   * tests/verbs_dpm.rs (a KN writing its log into `dinomo dpm serve --fabric verbs`),
#   * scripts/verbs-cluster.sh (a process cluster over verbs: redis-cli -c, redis-py,
#     bench --target compared with the same run over shm),
#   * tests/failover.rs over verbs: a KN SIGSTOPped past its lease, the DPM SIGKILLed and
#     restarted with the KNs and the manager carrying on,
#   * `dinomo torture --fabric verbs`: a KN and then the DPM killed under load, 0 violations.
# More test binaries: add a `run_in_vm` line below. This stage fails, loudly, when the VM
# cannot run here: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

VM=scripts/rxe-vm
stage_t0=$(date +%s.%N)
TIMINGS=()

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
show_timings() {
	printf '\n==> verbs: timings\n'
	((${#TIMINGS[@]} == 0)) || printf '%s\n' "${TIMINGS[@]}"
	printf '%7ss  the whole verbs stage\n' "$(elapsed "$stage_t0")"
}
fail() {
	show_timings
	printf '\nverbs stage FAILED: %s\n' "$*" >&2
	exit 1
}
# timed LABEL COMMAND...: runs COMMAND, records its wall time, fails the stage on error.
timed() {
	local label=$1 t0 rc=0
	shift
	printf '\n==> verbs: %s\n' "$label"
	t0=$(date +%s.%N)
	"$@" || rc=$?
	TIMINGS+=("$(printf '%7ss  %s' "$(elapsed "$t0")" "$label")")
	case $rc in
	0) ;;
	124) fail "$label: timed out" ;;
	125) fail "$label: the VM could not be set up (see the guest console above)" ;;
	*) fail "$label: exit status $rc" ;;
	esac
}

# ------------------------------------------------------------------ host packages
# The VM runs the host's userspace: what runs inside must be installed here.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) == *" installed" ]] || need+=(busybox-static)
compgen -G '/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so' >/dev/null || need+=(ibverbs-providers)
command -v ibv_devinfo >/dev/null || need+=(ibverbs-utils)
command -v rdma >/dev/null || need+=(iproute2)
command -v xz >/dev/null || need+=(xz-utils)
command -v ib_read_lat >/dev/null || need+=(perftest)
command -v redis-cli >/dev/null || need+=(redis-tools)
/usr/bin/python3 -c 'import redis.cluster' 2>/dev/null || need+=(python3-redis)
if ((${#need[@]})); then
	command -v apt-get >/dev/null || fail "no apt-get: install ${need[*]} by hand"
	printf '==> verbs: installing %s\n' "${need[*]}"
	apt-get update -qq || fail "apt-get update failed"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
		fail "apt-get install ${need[*]} failed"
fi

timed "prepare the VM (kernel, initramfs)" "$VM" --prepare
timed "boot the VM and list rxe0 (ibv_devinfo)" "$VM" -v --timeout 120 -- ibv_devinfo -d rxe0

# ------------------------------------------------------------------ test binaries
# test_binary SPEC: builds and prints the path of a test binary with --features rdma. SPEC
# is a test target of the root crate (`verbs_dpm`, `failover`) or PACKAGE:TARGET
# (`dinomo-hw:lib`, `host-kn:some_test`). Compiler messages go to stderr as usual.
test_binary() {
	local spec=$1 sel=() want
	case $spec in
	*:lib) sel=(-p "${spec%%:*}" --lib) want=${spec%%:*} ;;
	*:*) sel=(-p "${spec%%:*}" --test "${spec#*:}") want=${spec#*:} ;;
	*) sel=(--test "$spec") want=$spec ;;
	esac
	want=${want//-/_}
	local json
	json=$(cargo test --locked --features rdma "${sel[@]}" --no-run \
		--message-format=json-render-diagnostics) || return 1
	grep '"reason":"compiler-artifact"' <<<"$json" | grep '"test":true' |
		grep "\"name\":\"$want\"" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

# run_in_vm [--timeout SEC] SPEC [ARGS...]: builds test binary SPEC and runs it in the VM
# (where DINOMO_RDMA_DEVICE=rxe0 and DINOMO_RDMA_GID_INDEX=1 are set) with ARGS, by
# default `--ignored --test-threads=1`: the tests that need a device are the ignored ones.
run_in_vm() {
	local timeout=600
	if [[ ${1:-} == --timeout ]]; then
		timeout=$2
		shift 2
	fi
	local spec=$1 bin
	shift
	(($#)) || set -- --ignored --test-threads=1
	printf '\n==> verbs: build %s (--features rdma)\n' "$spec"
	bin=$(test_binary "$spec") || fail "cannot build test binary $spec"
	[[ -n $bin && -x $bin ]] || fail "cargo built no test binary for $spec"
	timed "$spec in the VM: ${bin##*/} $*" "$VM" --timeout "$timeout" -- "$bin" "$@"
}

run_in_vm dinomo-hw:lib
run_in_vm verbs_dpm

# ------------------------------------------------------------------ process cluster
timed "build dinomo --features rdma" cargo build --locked --bin dinomo --features rdma
timed "process cluster over verbs (scripts/verbs-cluster.sh)" \
	"$VM" --timeout 900 -- scripts/verbs-cluster.sh "${CARGO_TARGET_DIR:-target}/debug/dinomo"

# ------------------------------------------------------------------ failover over verbs
# The process tests take the fabric from DINOMO_RDMA_DEVICE (tests/common/fabric.rs): the
# same tests as over shm, with leases and deadlines scaled for the emulated VM.
# (A KN killed under writes is the torture's first round below.)
run_in_vm --timeout 1200 failover --test-threads=1 --exact \
	a_paused_kn_is_fenced_and_its_late_write_never_lands \
	a_restarted_dpm_is_rejoined_by_its_kns_and_manager_and_loses_nothing

# ------------------------------------------------------------------ torture over verbs
# A KN and then the DPM SIGKILLed under load, each round's history checked (lincheck).
# Long leases: a map change costs the manager about a thousand control round trips, each
# slow on a software device in an emulated VM.
timed "build dinomo --features rdma (the tests above may have relinked it)" \
	cargo build --locked --bin dinomo --features rdma
timed "dinomo torture --fabric verbs (2 rounds: a KN, the DPM)" \
	"$VM" --timeout 900 -- "${CARGO_TARGET_DIR:-target}/debug/dinomo" torture --fabric verbs \
	--rounds 2 --roles kn,dpm --kns 2 --lease-ms 15000 --recovery-limit 5m --region-size 64M \
	--no-fill --keys 64 --clients 2 --round-ms 3000

show_timings
