# Process and port helpers shared by the measurement scripts (kn-memory.sh, kn-vs-redis.sh).
# Sourced, not run.

# Whether $1 is still the process that was started (pid not reused): its executable is $2.
alive_as() {
    [[ -n $1 ]] && kill -0 "$1" 2>/dev/null &&
        [[ $(readlink "/proc/$1/exe" 2>/dev/null) == "$2"* ]]
}

# Every TCP port in use on this machine, one per line.
used_ports() {
    awk 'FNR > 1 { split($2, a, ":"); print strtonum("0x" a[2]) }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u
}

# The first of $1 consecutive free ports in 20000-49999, picked at random; fails after 200
# tries.
free_ports() {
    local n=$1 used first i ok try
    used=" $(used_ports | tr '\n' ' ') "
    for ((try = 0; try < 200; try++)); do
        first=$((20000 + RANDOM % 30000))
        ok=1
        for ((i = 0; i < n; i++)); do
            [[ $used == *" $((first + i)) "* ]] && { ok=0; break; }
        done
        ((ok)) && { echo "$first"; return 0; }
    done
    return 1
}

# Every process under $1 (`dinomo up` runs its children in their own process groups).
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1"); do
        echo "$c"
        descendants "$c"
    done
}

# Field $2 of "k:v" lines in $1 (INFO text); 0 when absent.
info_field() { awk -F: -v k="$2" '$1 == k { gsub("\r", "", $2); v = $2 } END { print v + 0 }' <<<"$1"; }

# What a result says of the dinomo binary $1 it measured, with no machine path in it: the
# checkout's revision (and whether it has uncommitted changes), and whether $1 is this
# checkout's release build or a binary given with --bin, which need not be.
dinomo_build() {
    local rev
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD 2>/dev/null || rev="$rev (with uncommitted changes)"
    if [[ $(realpath -e "$1" 2>/dev/null) == "$(realpath -m "${CARGO_TARGET_DIR:-target}/release/dinomo")" ]]; then
        echo "$rev, release build of this checkout"
    else
        echo "binary given with --bin, checkout at $rev"
    fi
}
