#!/usr/bin/env bash
# tiering-experiment.sh — the tiering experiment of docs/BENCHMARKS.md ("Tiering experiment").
#
# 1. Records a real QEMU trace: qemu-nbd (with --trace 'blk_co_p*') serves a qcow2 image through
#    nbdfuse; mke2fs -d writes an ext4 file system with /usr/share/doc into it, then debugfs -D
#    (O_DIRECT) reads files picked with a seeded power-law choice (plus one e2fsck -fn).
# 2. Runs `QcowTier.Benchmarks --experiment`: an emulated HDD (the shared slowdisk tool: nbdkit
#    delay+rate filters behind nbdfuse; or an in-process latency model when that is missing), a local
#    file as SSD, the workloads (zipf, zipf-1.2, shift, scan, uniform, qemu-trace) replayed against
#    all-HDD, all-SSD, tiered before and after rebalancing with SSD budgets 5/10/20/40 %.
# 3. Writes docs/experiment/*.png and the marked "Tiering experiment" section of docs/BENCHMARKS.md.
#
# Usage: scripts/tiering-experiment.sh [--quick] [--no-doc] [--no-trace] [--inproc] [--dir DIR] [--keep]
#   --quick     64 MiB image, short windows, 2 s per cell: a smoke run (~2 min); output stays in DIR/out
#   --no-doc    leave docs/ alone (the default with --quick)
#   --no-trace  skip the QEMU trace workload
#   --inproc    use the in-process HDD latency model instead of slowdisk
#   --dir DIR   work dir (default a new dir under /var/tmp; not tmpfs: O_DIRECT)
#   --keep      keep the work dir
# Environment: ARTIFACTS (default /tmp/art-bench-exp) for the build; SLOWDISK (default
# /work/shared/tools/slowdisk); EXPERIMENT_ARGS: more options for the experiment (see --experiment --help).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0; DOC=1; TRACE=1; INPROC=0; WORK=""; KEEP=0
ARTIFACTS=${ARTIFACTS:-/tmp/art-bench-exp}
SLOWDISK=${SLOWDISK:-/work/shared/tools/slowdisk}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; DOC=0 ;;
        --no-doc) DOC=0 ;;
        --no-trace) TRACE=0 ;;
        --inproc) INPROC=1 ;;
        --dir) WORK=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "tiering-experiment: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
log() { echo "tiering-experiment: $*" >&2; }

[[ -n "$WORK" ]] || WORK=$(mktemp -d /var/tmp/qcowtier-experiment.XXXXXX)
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
[[ "$(df -T "$WORK" | awk 'NR==2 {print $2}')" != tmpfs ]] || { log "$WORK is tmpfs (no O_DIRECT); use --dir"; exit 1; }
TMNT="$WORK/trace-mnt"
NBDFUSE_PID=""
cleanup() {
    if [[ -n "$NBDFUSE_PID" ]]; then
        umount "$TMNT" 2>/dev/null || true
        kill "$NBDFUSE_PID" 2>/dev/null || true
    fi
    if [[ $KEEP == 0 ]]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT

log "building QcowTier.Benchmarks (Release, artifacts in $ARTIFACTS)"
dotnet build "$ROOT/QcowTier.Benchmarks/QcowTier.Benchmarks.csproj" -c Release --artifacts-path "$ARTIFACTS" -nologo -v q >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; exit 1; }
DLL="$ARTIFACTS/bin/QcowTier.Benchmarks/release/QcowTier.Benchmarks.dll"

SIZE_MB=1024; SESSIONS=1500; SRC=/usr/share/doc
if [[ $QUICK == 1 ]]; then SIZE_MB=64; SESSIONS=150; SRC=/usr/share/zoneinfo; fi

# ---------------------------------------------------------------- 1. a QEMU trace
TRACE_FILE="$WORK/qemu-trace.log"
trace_ok=0
if [[ $TRACE == 1 ]]; then
    if command -v qemu-nbd >/dev/null && command -v nbdfuse >/dev/null && command -v mke2fs >/dev/null && command -v debugfs >/dev/null && [[ -e /dev/fuse ]]; then
        log "recording a QEMU trace (qemu-nbd --trace 'blk_co_p*' behind nbdfuse; mke2fs -d $SRC, $SESSIONS debugfs reads)"
        qemu-img create -q -f qcow2 "$WORK/trace.qcow2" "${SIZE_MB}M"
        mkdir -p "$TMNT"
        nbdfuse "$TMNT/disk" --socket-activation qemu-nbd -f qcow2 --trace "blk_co_p*,file=$TRACE_FILE" "$WORK/trace.qcow2" >"$WORK/nbdfuse.log" 2>&1 &
        NBDFUSE_PID=$!
        for _ in $(seq 100); do [[ -e "$TMNT/disk" ]] && break; sleep 0.1; done
        if [[ -e "$TMNT/disk" ]] && mke2fs -q -F -t ext4 -d "$SRC" "$TMNT/disk" >/dev/null 2>&1; then
            mapfile -t FILES < <(cd "$SRC" && find . -type f -size +0 | LC_ALL=C sort | sed 's|^\.||')
            n=${#FILES[@]}
            RANDOM=42 # deterministic choices
            for ((i = 0; i < SESSIONS; i++)); do
                # power-law pick: index = n * u^3, u uniform in [0,1): a few files are read often
                u=$RANDOM
                idx=$(( n * u / 32768 * u / 32768 * u / 32768 ))
                debugfs -D -R "cat \"${FILES[$idx]}\"" "$TMNT/disk" >/dev/null 2>&1 || true
                if (( i == SESSIONS * 2 / 3 )); then e2fsck -fn "$TMNT/disk" >/dev/null 2>&1 || true; fi
            done
            trace_ok=1
        else
            log "could not format the traced image; the qemu-trace workload is skipped"
        fi
        umount "$TMNT" 2>/dev/null || true
        kill "$NBDFUSE_PID" 2>/dev/null || true
        wait "$NBDFUSE_PID" 2>/dev/null || true
        NBDFUSE_PID=""
        [[ -s "$TRACE_FILE" ]] || trace_ok=0
        [[ $trace_ok == 1 ]] && log "trace: $(grep -c blk_co_preadv "$TRACE_FILE") reads, $(grep -c blk_co_pwritev "$TRACE_FILE") writes"
    else
        log "qemu-nbd, nbdfuse, mke2fs, debugfs or /dev/fuse missing: the qemu-trace workload is skipped"
    fi
fi

# ---------------------------------------------------------------- 2. the experiment
ARGS=(--experiment --work "$WORK/exp" --slowdisk "$SLOWDISK")
[[ $QUICK == 1 ]] && ARGS+=(--quick)
[[ $INPROC == 1 ]] && ARGS+=(--hdd inproc)
[[ $trace_ok == 1 ]] && ARGS+=(--trace "$TRACE_FILE")
[[ $KEEP == 1 ]] && ARGS+=(--keep)
if [[ $DOC == 1 ]]; then
    ARGS+=(--out "$ROOT/docs/experiment" --doc "$ROOT/docs/BENCHMARKS.md")
else
    ARGS+=(--out "$WORK/out")
fi
# shellcheck disable=SC2206
ARGS+=(${EXPERIMENT_ARGS:-})
log "dotnet $DLL ${ARGS[*]}"
dotnet "$DLL" "${ARGS[@]}"
if [[ $DOC == 0 && $KEEP == 0 ]]; then
    mkdir -p /var/tmp/qcowtier-experiment-last
    cp "$WORK/out"/* /var/tmp/qcowtier-experiment-last/ && log "results copied to /var/tmp/qcowtier-experiment-last"
fi
