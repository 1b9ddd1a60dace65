#!/usr/bin/env bash
# Compares qemu-img and qcowtier on the same images, in one run, interleaved (A B A B ...):
#   * `bench`   (qemu-img bench vs qcowtier bench; same -c -d -s -t, read and -w), cache=writeback and none
#   * `convert` (qemu-img convert vs qcowtier convert), qcow2 -> raw and raw -> qcow2
# on a ~1 GiB image with scattered data, and
#   * `check`   (qemu-img check vs qcowtier check) on a sparse 1 TiB image with thousands of L2 tables
#   * NBD       scripts/bench-nbd.sh (qemu-nbd vs qcowtier serve), when that script exists. Prints the machine, median wall times and ratios
# (qcowtier / qemu-img: below 1 means qcowtier is faster) as Markdown, and writes that into the
# marked section of docs/BENCHMARKS.md.
#
# Usage: scripts/bench-compare.sh [--quick] [--reps N] [--size-mb N] [--depth N] [--dir DIR]
#                                 [--no-doc] [--skip-convert] [--skip-bench] [--skip-check]
#                                 [--skip-nbd] [--check-gib N] [--keep]
#   --quick         1/8 of the request counts and 3 repetitions (a smoke test of the script)
#   --reps N        timed repetitions per tool and case (default 7), after one untimed warm-up each
#   --size-mb N     virtual size of the test image (default 1024)
#   --depth N       requests in flight for bench, -d (default 16)
#   --dir DIR       where to put the images (default: a new dir under /var/tmp; must not be tmpfs,
#                   cache=none needs O_DIRECT)
#   --no-doc        print only; leave docs/BENCHMARKS.md alone
#   --skip-convert / --skip-bench / --skip-check / --skip-nbd   leave that part out
#   --check-gib N   virtual size of the check image in GiB (default 1024; --quick 128): one 4 KiB
#                   block in every 512 MiB (one L2 table each) plus three times as many at random
#   --keep          keep the images afterwards
# Environment: QCOWTIER=/path/to/qcowtier skips the build and uses that binary; QEMU_IMG overrides
# qemu-img; ARTIFACTS (default /tmp/art-bench-cli) is the build's --artifacts-path.
# BENCH_COMPARE_DOC overrides the file written (default docs/BENCHMARKS.md).
#
# Exit codes: 0 ok, 1 a run failed or outputs differ, 2 qcowtier lacks a verb this script needs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOC=${BENCH_COMPARE_DOC:-"$ROOT/docs/BENCHMARKS.md"}
REPS=7
SIZE_MB=1024
DEPTH=16
QUICK=0
WRITE_DOC=1
DO_CONVERT=1
DO_BENCH=1
DO_CHECK=1
DO_NBD=1
CHECK_GIB=""
KEEP=0
WORK=""
QEMU_IMG=${QEMU_IMG:-qemu-img}
ARTIFACTS=${ARTIFACTS:-/tmp/art-bench-cli}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; REPS=3 ;;
        --reps) REPS=$2; shift ;;
        --size-mb) SIZE_MB=$2; shift ;;
        --depth) DEPTH=$2; shift ;;
        --dir) WORK=$2; shift ;;
        --no-doc) WRITE_DOC=0 ;;
        --skip-convert) DO_CONVERT=0 ;;
        --skip-bench) DO_BENCH=0 ;;
        --skip-check) DO_CHECK=0 ;;
        --skip-nbd) DO_NBD=0 ;;
        --check-gib) CHECK_GIB=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "bench-compare: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

log() { echo "bench-compare: $*" >&2; }
die() { echo "bench-compare: ERROR: $*" >&2; exit "${2:-1}"; }

command -v "$QEMU_IMG" >/dev/null || die "$QEMU_IMG not found"

# ------------------------------------------------------------------ build qcowtier (Release)
if [[ -z "${QCOWTIER:-}" ]]; then
    log "building QcowTier.Cli (Release, artifacts in $ARTIFACTS)"
    if ! dotnet build "$ROOT/QcowTier.Cli/QcowTier.Cli.csproj" -c Release --artifacts-path "$ARTIFACTS" -nologo -v q >"$ARTIFACTS.build.log" 2>&1; then
        tail -30 "$ARTIFACTS.build.log" >&2
        die "dotnet build of QcowTier.Cli failed (log: $ARTIFACTS.build.log)"
    fi
    # The project's AssemblyName is QcowTier.Cli, so the apphost is named that (not "qcowtier").
    QCOWTIER=$(find "$ARTIFACTS/bin/QcowTier.Cli" -type f \( -name qcowtier -o -name QcowTier.Cli \) -perm -u+x 2>/dev/null | grep -i release | head -1 || true)
    [[ -n "$QCOWTIER" ]] || die "built, but no qcowtier executable under $ARTIFACTS/bin/QcowTier.Cli"
fi
[[ -x "$QCOWTIER" ]] || die "QCOWTIER=$QCOWTIER is not executable"
log "qcowtier: $QCOWTIER"

# ------------------------------------------------------------------ work dir
if [[ -z "$WORK" ]]; then
    WORK=$(mktemp -d /var/tmp/qcowtier-compare.XXXXXX)
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
FSTYPE=$(df -T "$WORK" | awk 'NR==2 {print $2}')
[[ "$FSTYPE" != tmpfs ]] || die "$WORK is on tmpfs: cache=none (O_DIRECT) cannot work there; use --dir"
cleanup() { if [[ $KEEP == 0 ]]; then rm -rf "$WORK"; else log "images kept in $WORK"; fi; }
trap cleanup EXIT

# ------------------------------------------------------------------ does qcowtier have the verbs?
"$QEMU_IMG" create -q -f qcow2 "$WORK/probe.qcow2" 16M
"$QEMU_IMG" create -q -f raw "$WORK/probe.raw" 16M
probe() { # name, command...
    local name=$1; shift
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if [[ $rc -ne 0 ]] || grep -qi "not implemented" <<<"$out"; then
        echo "bench-compare: ERROR: \`qcowtier $name\` is not implemented (or failed) in this build:" >&2
        echo "    \$ ${*}" >&2
        sed 's/^/    | /' <<<"$out" | head -10 >&2
        echo "    exit code $rc. This script needs \`qcowtier $name\` with qemu-img's options; skip the half with --skip-bench / --skip-convert." >&2
        exit 2
    fi
}
if [[ $DO_BENCH == 1 ]]; then
    probe bench "$QCOWTIER" bench -f qcow2 -c 16 -d 4 -s 4096 -t writeback "$WORK/probe.qcow2"
    probe bench "$QCOWTIER" bench -f qcow2 -c 16 -d 4 -s 4096 -t none -w "$WORK/probe.qcow2"
fi
if [[ $DO_CONVERT == 1 ]]; then
    probe convert "$QCOWTIER" convert -f qcow2 -O raw "$WORK/probe.qcow2" "$WORK/probe-out.raw"
    probe convert "$QCOWTIER" convert -f raw -O qcow2 "$WORK/probe.raw" "$WORK/probe-out.qcow2"
fi
if [[ $DO_CHECK == 1 ]]; then
    probe check "$QCOWTIER" check -f qcow2 "$WORK/probe.qcow2"
fi
rm -f "$WORK"/probe*

# ------------------------------------------------------------------ machine
CPU=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
CORES=$(nproc)
RAM=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
KERNEL=$(uname -r)
FSDEV=$(df -T "$WORK" | awk 'NR==2 {print $1}')
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
QEMU_VER=$("$QEMU_IMG" --version | head -1)
DOTNET_VER=$(dotnet --version 2>/dev/null || echo "?")
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then COMMIT="$COMMIT (+ uncommitted changes)"; fi
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ test image: ~1 GiB, scattered data
R=0
rnd() { seed=$(( (seed * 1103515245 + 12345) % 2147483648 )); R=$(( seed / 65536 )); } # sets R, no subshell
DATA_DESC="(not made: --skip-bench and --skip-convert)"
if [[ $DO_BENCH == 1 || $DO_CONVERT == 1 ]]; then
    SRC_RAW="$WORK/src.raw"
    SRC_QCOW="$WORK/src.qcow2"
    log "making a ${SIZE_MB} MiB image with scattered data in $WORK"
    truncate -s "${SIZE_MB}M" "$SRC_RAW"
    seed=12345
    MIB=$SIZE_MB
    # About 30% of the disk: 1 MiB extents at random MiB positions, plus single 64 KiB clusters at
    # random cluster positions (the scattered part), all random bytes.
    for ((i = 0; i < MIB * 20 / 100; i++)); do
        rnd
        dd if=/dev/urandom of="$SRC_RAW" bs=1M count=1 seek=$(( R % MIB )) conv=notrunc status=none
    done
    for ((i = 0; i < MIB * 16 * 10 / 100; i++)); do
        rnd
        dd if=/dev/urandom of="$SRC_RAW" bs=64K count=1 seek=$(( R % (MIB * 16) )) conv=notrunc status=none
    done
    "$QEMU_IMG" convert -f raw -O qcow2 "$SRC_RAW" "$SRC_QCOW"
    ALLOC=$(( $(stat -c %b "$SRC_QCOW") * 512 ))
    DATA_DESC="$(( ALLOC >> 20 )) MiB of data in ${SIZE_MB} MiB virtual (qcow2 file's allocated size)"
    sync "$SRC_RAW" "$SRC_QCOW"
fi

# ------------------------------------------------------------------ timing helpers
now() { echo "${EPOCHREALTIME/,/.}"; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {printf "%.4f\n", (a[NR/2]+a[NR/2+1])/2}}'; }
# "median (min–max)" of the values on stdin, 3 decimals: the spread shows how far to trust a ratio.
summary() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "-"; exit}; m = (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf "%.3f (%.3f–%.3f)\n", m, a[1], a[NR]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a == a+0) printf "%.2f", a/b; else print "-" }'; }
fmt() { awk -v a="$1" 'BEGIN { if (a == a+0) printf "%.3f", a; else print "-" }'; }

# run_timed OUTVAR_WALL OUTVAR_SELF cmd...: wall seconds, and the tool's own "completed in X seconds" if it prints one.
LAST_WALL=""; LAST_SELF=""
run_timed() {
    local t0 t1 out rc=0
    t0=$(now)
    out=$("$@" 2>&1) || rc=$?
    t1=$(now)
    if [[ $rc -ne 0 ]]; then
        echo "bench-compare: ERROR: command failed (exit $rc): $*" >&2
        sed 's/^/    | /' <<<"$out" | tail -10 >&2
        exit 1
    fi
    LAST_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b-a}')
    LAST_SELF=$(grep -oiE 'completed in [0-9.]+ ?s' <<<"$out" | grep -oE '[0-9.]+' | tail -1 || true)
    [[ -n "$LAST_SELF" ]] || LAST_SELF="nan"
}

RESULTS_BENCH=""
RESULTS_CONVERT=""

# ------------------------------------------------------------------ bench
if [[ $DO_BENCH == 1 ]]; then
    IMG="$WORK/bench.qcow2"
    cp --sparse=always "$SRC_QCOW" "$IMG"
    div=1; [[ $QUICK == 1 ]] && div=8
    # size:cache:count — sized for ~1-3 s per run here; O_DIRECT runs fewer requests.
    CASES=(
        "4096:writeback:$(( 262144 / div ))"
        "65536:writeback:$(( 16384 / div ))"
        "4096:none:$(( 65536 / div ))"
        "65536:none:$(( 8192 / div ))"
    )
    for c in "${CASES[@]}"; do
        IFS=: read -r size cache count <<<"$c"
        for mode in read write; do
            wflag=(); [[ $mode == write ]] && wflag=(-w)
            args=(bench -f qcow2 -c "$count" -d "$DEPTH" -s "$size" -t "$cache" "${wflag[@]}" "$IMG")
            label="$mode -s $size -t $cache -c $count -d $DEPTH"
            log "bench: $label"
            # One untimed run each first: warms the page cache and, for writes, allocates every
            # cluster the run touches, so the timed runs compare the same (in-place) work.
            run_timed "$QEMU_IMG" "${args[@]}"
            run_timed "$QCOWTIER" "${args[@]}"
            qw=(); qs=(); tw=(); ts=()
            for ((r = 0; r < REPS; r++)); do
                sync "$IMG"
                run_timed "$QEMU_IMG" "${args[@]}"; qw+=("$LAST_WALL"); qs+=("$LAST_SELF")
                sync "$IMG"
                run_timed "$QCOWTIER" "${args[@]}"; tw+=("$LAST_WALL"); ts+=("$LAST_SELF")
            done
            mqw=$(printf '%s\n' "${qw[@]}" | median); mtw=$(printf '%s\n' "${tw[@]}" | median)
            mqs=$(printf '%s\n' "${qs[@]}" | grep -v nan | median); mts=$(printf '%s\n' "${ts[@]}" | grep -v nan | median)
            mib=$(awk -v n="$count" -v s="$size" -v t="$mtw" 'BEGIN { if (t > 0) printf "%.0f", n*s/1048576/t; else print "-" }')
            mibq=$(awk -v n="$count" -v s="$size" -v t="$mqw" 'BEGIN { if (t > 0) printf "%.0f", n*s/1048576/t; else print "-" }')
            RESULTS_BENCH+="| $mode | $size | $cache | $count | $(printf '%s\n' "${qw[@]}" | summary) | $(printf '%s\n' "${tw[@]}" | summary) | **$(ratio "$mtw" "$mqw")** | $(fmt "$mqs") | $(fmt "$mts") | $(ratio "$mts" "$mqs") | $mibq | $mib |"$'\n'
        done
    done
    "$QEMU_IMG" check -q "$IMG" || die "qemu-img check found problems in the bench image after the runs"
fi

# ------------------------------------------------------------------ convert
if [[ $DO_CONVERT == 1 ]]; then
    # direction: from-fmt to-fmt source
    for dir in "qcow2 raw $SRC_QCOW" "raw qcow2 $SRC_RAW"; do
        read -r from to src <<<"$dir"
        log "convert: $from -> $to"
        qw=(); tw=()
        for ((r = -1; r < REPS; r++)); do # r = -1: untimed warm-up of both
            for tool in qemu qcowtier; do
                if [[ $tool == qemu ]]; then bin=$QEMU_IMG; else bin=$QCOWTIER; fi
                out="$WORK/out-$tool.$to"
                rm -f "$out"
                # Timed: the conversion and an fsync of its output, so tools that flush and tools
                # that leave dirty pages (qemu-img convert defaults to cache=unsafe) pay the same.
                run_timed bash -c '"$1" convert -f "$2" -O "$3" "$4" "$5" && sync "$5"' _ "$bin" "$from" "$to" "$src" "$out"
                if [[ $r -ge 0 ]]; then
                    if [[ $tool == qemu ]]; then qw+=("$LAST_WALL"); else tw+=("$LAST_WALL"); fi
                fi
            done
        done
        # Same guest content from both tools, and a clean image from qcowtier.
        "$QEMU_IMG" compare -q -f "$to" -F "$to" "$WORK/out-qemu.$to" "$WORK/out-qcowtier.$to" \
            || die "convert $from -> $to: qcowtier's output differs from qemu-img's"
        if [[ $to == qcow2 ]]; then
            "$QEMU_IMG" check -q "$WORK/out-qcowtier.qcow2" || die "convert $from -> $to: qemu-img check fails on qcowtier's output"
        fi
        sq=$(stat -c %b "$WORK/out-qemu.$to"); st=$(stat -c %b "$WORK/out-qcowtier.$to")
        mqw=$(printf '%s\n' "${qw[@]}" | median); mtw=$(printf '%s\n' "${tw[@]}" | median)
        RESULTS_CONVERT+="| $from → $to | $(printf '%s\n' "${qw[@]}" | summary) | $(printf '%s\n' "${tw[@]}" | summary) | **$(ratio "$mtw" "$mqw")** | $(( sq / 2048 )) | $(( st / 2048 )) |"$'\n'
        rm -f "$WORK"/out-*
    done
fi

# ------------------------------------------------------------------ check (many L2 tables)
RESULTS_CHECK=""
CHECK_DESC=""
if [[ $DO_CHECK == 1 ]]; then
    [[ -n "$CHECK_GIB" ]] || { if [[ $QUICK == 1 ]]; then CHECK_GIB=128; else CHECK_GIB=1024; fi; }
    CIMG="$WORK/sparse.qcow2"
    TABLES=$(( CHECK_GIB * 2 )) # 64 KiB clusters: one L2 table maps 512 MiB
    log "check: making a sparse ${CHECK_GIB} GiB image: one 4 KiB block in each of its $TABLES L2 ranges plus $(( TABLES * 3 )) at random"
    "$QEMU_IMG" create -q -f qcow2 "$CIMG" "${CHECK_GIB}G"
    seed=4242
    {
        for ((t = 0; t < TABLES; t++)); do rnd; echo "write -P 0x5a $(( t * 512 * 1048576 + (R % 131072) * 4096 )) 4k"; done
        for ((t = 0; t < TABLES * 3; t++)); do rnd; a=$R; rnd; echo "write -P 0xa5 $(( ((a * 32768 + R) % (CHECK_GIB * 262144)) * 4096 )) 4k"; done
    } | qemu-io -f qcow2 "$CIMG" >/dev/null
    "$QEMU_IMG" check -q "$CIMG" || die "qemu-img check fails on the sparse image qemu-io made"
    CALLOC=$(( $(stat -c %b "$CIMG") * 512 ))
    CHECK_DESC="${CHECK_GIB} GiB virtual, ${TABLES} L2 tables, $(( TABLES * 4 )) scattered 4 KiB writes (by qemu-io), $(( CALLOC >> 20 )) MiB file"
    sync "$CIMG"
    # Start-up and open cost alone: `info` on a 16 MiB image, so the check rows can be read net of it.
    "$QEMU_IMG" create -q -f qcow2 "$WORK/tiny.qcow2" 16M
    for mode in info "" "--output=json"; do
        qw=(); tw=()
        if [[ $mode == info ]]; then
            for ((r = -1; r < REPS; r++)); do
                run_timed "$QEMU_IMG" info -f qcow2 "$WORK/tiny.qcow2"; [[ $r -lt 0 ]] || qw+=("$LAST_WALL")
                run_timed "$QCOWTIER" info -f qcow2 "$WORK/tiny.qcow2"; [[ $r -lt 0 ]] || tw+=("$LAST_WALL")
            done
            mqw=$(printf '%s\n' "${qw[@]}" | median); mtw=$(printf '%s\n' "${tw[@]}" | median)
            RESULTS_CHECK+="| info -f qcow2 (16 MiB image: start-up + open) | $(printf '%s\n' "${qw[@]}" | summary) | $(printf '%s\n' "${tw[@]}" | summary) | $(ratio "$mtw" "$mqw") |"$'\n'
            continue
        fi
        for ((r = -1; r < REPS; r++)); do # r = -1: untimed warm-up of both
            # shellcheck disable=SC2086 # $mode is empty or one word
            run_timed "$QEMU_IMG" check -f qcow2 $mode "$CIMG"; [[ $r -lt 0 ]] || qw+=("$LAST_WALL")
            # shellcheck disable=SC2086
            run_timed "$QCOWTIER" check -f qcow2 $mode "$CIMG"; [[ $r -lt 0 ]] || tw+=("$LAST_WALL")
        done
        mqw=$(printf '%s\n' "${qw[@]}" | median); mtw=$(printf '%s\n' "${tw[@]}" | median)
        log "check ${mode:-(human output)}: qemu-img $mqw s, qcowtier $mtw s, ratio $(ratio "$mtw" "$mqw")"
        RESULTS_CHECK+="| check -f qcow2 ${mode} | $(printf '%s\n' "${qw[@]}" | summary) | $(printf '%s\n' "${tw[@]}" | summary) | **$(ratio "$mtw" "$mqw")** |"$'\n'
    done
    rm -f "$CIMG"
fi

# ------------------------------------------------------------------ NBD (scripts/bench-nbd.sh, when present)
RESULTS_NBD=""
NBD_SCRIPT="$ROOT/scripts/bench-nbd.sh"
if [[ $DO_NBD == 1 ]]; then
    if [[ -f "$NBD_SCRIPT" ]]; then
        nbd_args=(); [[ $QUICK == 0 ]] || nbd_args+=(--quick)
        log "nbd: running $NBD_SCRIPT ${nbd_args[*]}"
        nbd_rc=0
        nbd_out=$(QCOWTIER="$QCOWTIER" QEMU_IMG="$QEMU_IMG" bash "$NBD_SCRIPT" "${nbd_args[@]}" 2>"$WORK/bench-nbd.err") || nbd_rc=$?
        if [[ $nbd_rc -ne 0 ]]; then
            log "nbd: $NBD_SCRIPT exited $nbd_rc (stderr tail below); its section says so"
            tail -5 "$WORK/bench-nbd.err" | sed 's/^/    | /' >&2
        fi
        RESULTS_NBD="Output of \`scripts/bench-nbd.sh ${nbd_args[*]}\` (exit code $nbd_rc):"$'\n\n'"$nbd_out"
    else
        log "nbd: $NBD_SCRIPT does not exist (yet); skipped"
        RESULTS_NBD="Skipped: \`scripts/bench-nbd.sh\` does not exist in this tree yet."
    fi
fi

# ------------------------------------------------------------------ report
QUICK_FLAG=""; [[ $QUICK == 0 ]] || QUICK_FLAG=" --quick"
REPORT=$(cat <<EOF
### qemu-img vs qcowtier (scripts/bench-compare.sh)

Generated by \`scripts/bench-compare.sh$QUICK_FLAG\` on $DATE.

| Machine | |
|---|---|
| CPU | $CPU, $CORES cores |
| RAM | $RAM |
| Kernel | $KERNEL |
| File system | $FSTYPE on $FSDEV ($WORK) |
| Tools | $QEMU_VER; .NET SDK $DOTNET_VER; QcowTier $COMMIT |
| Load average at start | $LOAD |

Image: $DATA_DESC, 64 KiB clusters, made by \`qemu-img convert\` from a sparse raw file with
1 MiB extents and single 64 KiB clusters of random bytes at pseudo-random positions.
Each case: one untimed warm-up run per tool, then $REPS timed runs per tool, interleaved
(qemu-img, qcowtier, qemu-img, qcowtier, ...), \`sync\` between runs; medians.
**Ratio = qcowtier / qemu-img time: below 1.00 qcowtier is faster.**
EOF
)
if [[ $DO_BENCH == 1 ]]; then
REPORT+=$'\n\n'$(cat <<EOF
#### bench (\`qemu-img bench\` / \`qcowtier bench\` with the same \`-f qcow2 -c -d $DEPTH -s -t [-w]\`)

Wall = whole process (start-up, open, run, close with its flush). Self = the tool's own
"Run completed in" time, when it prints one. Write runs follow a warm-up write of the same
range, so they rewrite allocated clusters. Wall times: median (min–max) over the runs; ratios
and MiB/s from the medians.

| Op | -s | -t | -c | qemu-img wall s | qcowtier wall s | Ratio | qemu-img self s | qcowtier self s | Self ratio | qemu-img MiB/s | qcowtier MiB/s |
|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
$RESULTS_BENCH
EOF
)
fi
REPORT2=$(cat <<EOF
### qemu-img check and NBD (scripts/bench-compare.sh)

Generated by \`scripts/bench-compare.sh$QUICK_FLAG\` on $DATE: $CPU, $CORES cores, $RAM RAM, kernel $KERNEL,
$FSTYPE on $FSDEV; $QEMU_VER; .NET SDK $DOTNET_VER; QcowTier $COMMIT; load average at start $LOAD.
EOF
)
if [[ $DO_CHECK == 1 ]]; then
REPORT2+=$'\n\n'$(cat <<EOF
#### check (\`qemu-img check\` / \`qcowtier check\` on an image with many L2 tables)

Image: $CHECK_DESC. Each tool: one untimed warm-up, then $REPS timed runs, interleaved; the image
file is in the page cache. Wall time of the whole process (start-up included), median (min–max), s.
**Ratio = qcowtier / qemu-img.**

| Command | qemu-img s | qcowtier s | Ratio |
|---|---:|---:|---:|
$RESULTS_CHECK
EOF
)
fi
if [[ $DO_NBD == 1 ]]; then
REPORT2+=$'\n\n'$(cat <<EOF
#### NBD (qemu-nbd vs qcowtier serve, scripts/bench-nbd.sh)

$RESULTS_NBD
EOF
)
fi
if [[ $DO_CONVERT == 1 ]]; then
REPORT+=$'\n\n'$(cat <<EOF
#### convert (\`convert -f FROM -O TO src dst\`, each tool with its default options)

Timed: the conversion plus \`sync dst\` (qemu-img convert writes with cache=unsafe by default and
does not flush). Outputs checked equal with \`qemu-img compare\` (and \`qemu-img check\` for qcow2).
Source files are in the page cache.

| Direction | qemu-img s, median (min–max) | qcowtier s, median (min–max) | Ratio | qemu-img output MiB on disk | qcowtier output MiB on disk |
|---|---:|---:|---:|---:|---:|
$RESULTS_CONVERT
EOF
)
fi

echo
[[ $DO_BENCH == 0 && $DO_CONVERT == 0 ]] || echo "$REPORT"
[[ $DO_CHECK == 0 && $DO_NBD == 0 ]] || { echo; echo "$REPORT2"; }

# write_section TAG TITLE CONTENT: replace the marked section TAG of $DOC (appended under "## TITLE" when missing).
write_section() {
    local tag=$1 title=$2 content=$3
    local begin="<!-- BEGIN $tag (generated by scripts/bench-compare.sh; edits here are overwritten) -->"
    local end="<!-- END $tag -->"
    mkdir -p "$(dirname "$DOC")"
    [[ -f "$DOC" ]] || printf '# Benchmarks\n' >"$DOC"
    if ! grep -qF "$end" "$DOC"; then
        printf '\n## %s\n\n%s\n%s\n' "$title" "$begin" "$end" >>"$DOC"
    fi
    local tmp
    tmp=$(mktemp)
    CONTENT="$content" awk -v begin="<!-- BEGIN $tag (" -v end="$end" '
        index($0, begin) { print; print ENVIRON["CONTENT"]; skip = 1; next }
        index($0, end) { skip = 0 }
        !skip { print }
    ' "$DOC" >"$tmp"
    cat "$tmp" >"$DOC"
    rm -f "$tmp"
    log "updated the $tag section of $DOC"
}

if [[ $WRITE_DOC == 1 ]]; then
    # Each part keeps its own marked section, so a run with --skip-... leaves the others' figures alone.
    if [[ $DO_BENCH == 1 || $DO_CONVERT == 1 ]]; then
        write_section bench-compare "qemu-img comparison" "$REPORT"
    fi
    if [[ $DO_CHECK == 1 || $DO_NBD == 1 ]]; then
        write_section compare-check-nbd "qemu-img check and NBD comparison" "$REPORT2"
    fi
fi
