#!/usr/bin/env bash
# Compares qemu-nbd and `qcowtier serve` serving the same cached qcow2 image, in one run, interleaved
# (A B A B ...): fio's nbd engine (ioengine=nbd, one connection) for 4 KiB random reads at iodepth 16
# and 64 KiB sequential reads, plus nbdcopy throughput (export -> null:, with its default 4 connections
# and with one). Both servers run read-only
# side by side (shared image locks), each on its own Unix socket, with cache=writeback.
# Prints the machine, median figures and ratios (qcowtier / qemu-nbd: above 1 means qcowtier is
# faster) as Markdown.
#
# Usage: scripts/bench-nbd.sh [--quick] [--reps N] [--runtime S] [--size-mb N] [--dir DIR] [--keep]
#   --quick       2 repetitions of 3 s (a smoke test of the script)
#   --reps N      timed repetitions per server and case (default 5)
#   --runtime S   seconds per fio run (default 5)
#   --size-mb N   virtual size of the image, fully written (default 1024)
#   --dir DIR     where to keep the cached image (default /var/tmp/qcowtier-bench-nbd; reused when present)
#   --keep        keep nothing but the cached image is always kept; --keep also keeps the logs
# Environment: QCOWTIER=/path/to/qcowtier skips the build; ARTIFACTS (default /tmp/art-bench-nbd).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=5
RUNTIME=5
SIZE_MB=1024
WORK=/var/tmp/qcowtier-bench-nbd
KEEP=0
ARTIFACTS=${ARTIFACTS:-/tmp/art-bench-nbd}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) REPS=2; RUNTIME=3 ;;
        --reps) REPS=$2; shift ;;
        --runtime) RUNTIME=$2; shift ;;
        --size-mb) SIZE_MB=$2; shift ;;
        --dir) WORK=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "bench-nbd: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

log() { echo "bench-nbd: $*" >&2; }
die() { echo "bench-nbd: ERROR: $*" >&2; exit 1; }
for t in qemu-nbd qemu-img qemu-io fio nbdcopy python3; do
    command -v $t >/dev/null || die "$t not found (apt-get install qemu-utils fio libnbd-bin)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

# ------------------------------------------------------------------ build qcowtier (Release)
if [[ -z "${QCOWTIER:-}" ]]; then
    log "building QcowTier.Cli (Release, artifacts in $ARTIFACTS)"
    mkdir -p "$(dirname "$ARTIFACTS")"
    if ! dotnet build "$ROOT/QcowTier.Cli/QcowTier.Cli.csproj" -c Release --artifacts-path "$ARTIFACTS" -nologo -v q >"$ARTIFACTS.build.log" 2>&1; then
        tail -30 "$ARTIFACTS.build.log" >&2
        die "dotnet build of QcowTier.Cli failed (log: $ARTIFACTS.build.log)"
    fi
    QCOWTIER=$(find "$ARTIFACTS/bin/QcowTier.Cli" -type f \( -name qcowtier -o -name QcowTier.Cli \) -perm -u+x 2>/dev/null | grep -i release | head -1 || true)
    [[ -n "$QCOWTIER" ]] || die "built, but no qcowtier executable under $ARTIFACTS/bin/QcowTier.Cli"
fi
log "qcowtier: $QCOWTIER"

# ------------------------------------------------------------------ the cached image
mkdir -p "$WORK"
IMG="$WORK/bench-${SIZE_MB}M.qcow2"
if [[ ! -f "$IMG" ]]; then
    log "making a fully written ${SIZE_MB} MiB qcow2 image $IMG"
    qemu-img create -q -f qcow2 "$IMG.tmp" "${SIZE_MB}M"
    qemu-io -f qcow2 -c "write -P 0x5a 0 ${SIZE_MB}M" "$IMG.tmp" >/dev/null
    mv "$IMG.tmp" "$IMG"
fi
cat "$IMG" >/dev/null # into the page cache: this compares servers, not disks

RUN=$(mktemp -d /tmp/bench-nbd.XXXXXX)
QPID=""
TPID=""
cleanup() {
    [[ -n "$QPID" ]] && kill "$QPID" 2>/dev/null || true
    [[ -n "$TPID" ]] && kill "$TPID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ $KEEP == 0 ]]; then rm -rf "$RUN"; else log "logs kept in $RUN"; fi
}
trap cleanup EXIT

QSOCK="$RUN/qemu-nbd.sock"
TSOCK="$RUN/qcowtier.sock"
qemu-nbd --read-only --persistent --shared=8 --format=qcow2 --cache=writeback --aio=threads --socket="$QSOCK" "$IMG" 2>"$RUN/qemu-nbd.err" &
QPID=$!
"$QCOWTIER" serve --read-only --socket "$TSOCK" "$IMG" >"$RUN/qcowtier.out" 2>"$RUN/qcowtier.err" &
TPID=$!
for _ in $(seq 100); do [[ -S "$QSOCK" && -S "$TSOCK" ]] && break; sleep 0.1; done
[[ -S "$QSOCK" ]] || die "qemu-nbd did not start: $(cat "$RUN/qemu-nbd.err")"
[[ -S "$TSOCK" ]] || die "qcowtier serve did not start: $(cat "$RUN/qcowtier.err")"
uri() { echo "nbd+unix:///?socket=$1"; }

# Server CPU time (user + system) in clock ticks: the load-independent half of the comparison.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# fio's nbd engine; prints "IOPS MiB/s ops".
fio_run() { # socket rw bs depth
    local out
    out=$(fio --name=nbd --ioengine=nbd --uri="$(uri "$1")" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="${SIZE_MB}M" --time_based --runtime="$RUNTIME" --numjobs=1 \
        --randrepeat=0 --norandommap --output-format=json 2>>"$RUN/fio.err") || die "fio failed: $(tail -5 "$RUN/fio.err")"
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    python3 -c 'import json,sys; s=sys.stdin.read(); r=json.loads(s[s.index("{"):])["jobs"][0]["read"]; print("%.0f %.1f %d" % (r["iops"], r["bw_bytes"]/1048576, r["total_ios"]))' <<<"$out"
}

# nbdcopy export -> null:; prints "MiB/s" and, as ops, the MiB copied (CPU is then per MiB).
copy_run() { # socket [nbdcopy options]
    local s e sock=$1
    shift
    s=$(date +%s.%N)
    nbdcopy "$@" "$(uri "$sock")" null: || die "nbdcopy failed"
    e=$(date +%s.%N)
    python3 -c "print('%.1f %.1f %d' % ($SIZE_MB / ($e - $s), $SIZE_MB / ($e - $s), $SIZE_MB))"
}

declare -A RES
CASES=("randread 4k 16" "read 64k 16" "nbdcopy" "nbdcopy1")
log "warm-up"
fio_run "$QSOCK" randread 4k 16 >/dev/null
fio_run "$TSOCK" randread 4k 16 >/dev/null
for ((rep = 1; rep <= REPS; rep++)); do
    for c in "${CASES[@]}"; do
        for server in qemu-nbd qcowtier; do
            sock=$QSOCK; pid=$QPID
            [[ $server == qcowtier ]] && sock=$TSOCK && pid=$TPID
            c0=$(cpu_ticks "$pid")
            if [[ $c == nbdcopy ]]; then
                v=$(copy_run "$sock")
            elif [[ $c == nbdcopy1 ]]; then
                v=$(copy_run "$sock" --connections=1)
            else
                read -r rw bs depth <<<"$c"
                v=$(fio_run "$sock" "$rw" "$bs" "$depth")
            fi
            c1=$(cpu_ticks "$pid")
            # Appends the server's CPU microseconds per op (per MiB for nbdcopy).
            v="$v $(python3 -c "print('%.2f' % (($c1 - $c0) * 1e6 / $TICK / max(1, ${v##* })))")"
            RES["$c|$server"]+="$v;"
            log "rep $rep  $c  $server: $v"
        done
    done
done

# ------------------------------------------------------------------ report
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
echo
echo "### NBD server: qemu-nbd vs qcowtier serve ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "Machine: $(nproc) cores, $CPU, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo "$(qemu-nbd --version | head -1); $(fio --version); nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}'); commit $(git -C "$ROOT" rev-parse --short HEAD)."
echo "Image: ${SIZE_MB} MiB qcow2, fully allocated, 64 KiB clusters, in the page cache; both servers read-only, cache=writeback,"
echo "Unix sockets, one connection per fio job; $REPS interleaved repetitions of ${RUNTIME} s (fio) per case; medians (min–max)."
echo "Server CPU: user+system time of the server process during the run over the ops completed (lower is better; CPU ratio below 1 means qcowtier spends less)."
echo
echo "| Case | qemu-nbd | qcowtier serve | qcowtier / qemu-nbd | server CPU µs/op, qemu-nbd | server CPU µs/op, qcowtier | CPU ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for c in "${CASES[@]}"; do
    python3 - "$c" "${RES["$c|qemu-nbd"]}" "${RES["$c|qcowtier"]}" <<'EOF'
import statistics, sys
case, q, t = sys.argv[1], sys.argv[2], sys.argv[3]
def parse(s):
    return [[float(x) for x in v.split()] for v in s.split(";") if v.strip()]
q, t = parse(q), parse(t)
if case == "nbdcopy":
    label, col, unit = "nbdcopy export → null:, its default 4 connections (MiB/s; CPU per MiB)", 0, "MiB/s"
elif case == "nbdcopy1":
    label, col, unit = "nbdcopy export → null:, --connections=1 (MiB/s; CPU per MiB)", 0, "MiB/s"
elif case.startswith("randread"):
    label, col, unit = "fio randread 4 KiB, iodepth 16 (IOPS)", 0, "IOPS"
else:
    label, col, unit = "fio read 64 KiB sequential, iodepth 16 (MiB/s)", 1, "MiB/s"
qv = [r[col] for r in q]; tv = [r[col] for r in t]
fmt = lambda v: f"{statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f})"
qc = [r[3] for r in q]; tc = [r[3] for r in t]
fc = lambda v: f"{statistics.median(v):.1f}"
print(f"| {label} | {fmt(qv)} | {fmt(tv)} | **{statistics.median(tv) / statistics.median(qv):.2f}×** | {fc(qc)} | {fc(tc)} | {statistics.median(tc) / statistics.median(qc):.2f} |")
EOF
done
