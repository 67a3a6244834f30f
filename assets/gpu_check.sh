#!/usr/bin/env bash
# The GPU check of issue 21: the kernel and the trainer proven and timed in one short GPU session.
#
#   bash assets/gpu_check.sh                    # on a GPU machine: results in $OUT
#   bash assets/gpu_check.sh results/           # ... or in a folder of your choice
#   bash assets/gpu_check.sh --only ce results/ # only some stages (a rerun) ...
#   bash assets/gpu_check.sh --only d --budget d=300 results/   # ... with a budget of its own
#   bash assets/gpu_check.sh --cpu-smoke DIR    # every stage at toy sizes on the CPU (test_dit.py runs this)
#
# Five stages, in order, each under its own time budget. Each writes its result file as soon as it
# has one (and again as it goes), so a run cut short still returns every finished stage, and a
# failed or timed-out stage never stops the next one.
#   a  kernel correctness, compiled: test_dit.py's kernel tests on CUDA, then N = 256..16384,
#      D = 64/72/128, bf16/fp16, fused-qkv strides, cross-attention, key lengths   -> a_kernel.txt
#   b  one DiT-S/2 training step, --attn triton against sdpa (loss, gradients)     -> b_step.txt
#   c  the kernel table: ours, SDPA flash/efficient/cuDNN, plain PyTorch, TFLOP/s  -> c_attention.md
#   d  train.py --benchmark: DiT-S/2; DiT-XL/2 at 256 tokens, bf16, the largest
#      batch that fits, compile off and on                                         -> d_train.md
#   e  a short `train.py --preset gpu` run and its sample grid                     -> e_preset.txt, e_grid.png
# Also summary.txt (the device, then one line per stage) and log.txt (everything printed): eight
# files in all, the most a device run returns. The budgets add up to 500 s; the machine's python3
# runs it (PYTHON=... to choose another). Exit status: 0 when every stage passed, 1 otherwise, 2
# for a bad command line.
set -u -o pipefail

usage="usage: bash assets/gpu_check.sh [--cpu-smoke] [--only STAGES] [--budget STAGE=SECONDS]... [OUT_DIR]"
smoke=0 only=abcde dir=${OUT:-} overrides=()
while (($#)); do
    case $1 in
        --cpu-smoke) smoke=1 ;;
        --only) only=${2:-}; shift ;;
        --budget)
            if [[ ! ${2:-} =~ ^[a-e]=[1-9][0-9]*$ ]]; then
                echo "gpu_check.sh: --budget takes STAGE=SECONDS, e.g. --budget d=300; got '${2:-}'" >&2; exit 2
            fi
            overrides+=("$2"); shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1; $usage" >&2; exit 2 ;;
        *) dir=$1 ;;
    esac
    shift
done
if [[ ! $only =~ ^[a-e]+$ ]]; then
    echo "gpu_check.sh: --only takes stage letters from abcde, e.g. --only ce; got '$only'" >&2; exit 2
fi
if [[ -z $dir ]]; then
    echo "gpu_check.sh: no output folder: pass OUT_DIR or set OUT; $usage" >&2; exit 2
fi
mkdir -p "$dir" || exit 2
out=$(cd "$dir" && pwd)
cd "$(dirname "$0")/.." || exit 2   # the repository root: the stages import its modules
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
log=$out/log.txt summary=$out/summary.txt
: >"$log"
: >"$summary"

export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10   # every line reaches the log at once; few bar redraws
if ((smoke)); then
    # The CPU, whatever this machine has: the kernel in Triton's interpreter, toy sizes, and one
    # thread per process (toy tensors gain nothing from more; on a busy machine they lose a lot).
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    flag=--smoke budgets=(a=240 b=120 c=120 d=240 e=120)
else
    unset TRITON_INTERPRET
    flag="" budgets=(a=120 b=40 c=90 d=190 e=60)   # 500 s: 8 min 20 s at most
fi
budgets+=(${overrides[@]+"${overrides[@]}"})
budget() { local b s; for b in "${budgets[@]}"; do [[ $b == "$1="* ]] && s=${b#*=}; done; echo "$s"; }

say() { echo "$*" | tee -a "$log"; }

# run_stage LETTER RESULT TITLE COMMAND...: the command under the stage's budget (timeout ends its
# whole process group, worker processes included), its output into the log, one summary line.
failed=0
run_stage() {
    local letter=$1 result=$2 title=$3 seconds start rc status
    shift 3
    [[ $only == *$letter* ]] || return 0
    seconds=$(budget "$letter")
    say ""
    say "=== stage $letter: $title (budget ${seconds} s) ==="
    start=$SECONDS
    timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [[ $rc == 124 || $rc == 137 ]]; then status="timeout after ${seconds} s"
    elif [[ $rc != 0 ]]; then status="failed (exit $rc)"
    elif [[ ! -s $out/$result ]]; then status="failed (no $result)"
    else status=ok
    fi
    [[ $status == ok ]] || failed=1
    echo "$letter $status | $((SECONDS - start)) s | $result | $title" >>"$summary"
    say "=== stage $letter: $status in $((SECONDS - start)) s ==="
}

say "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on ${HOSTNAME:-?}: stages $only$( ((smoke)) && echo ', CPU smoke run')"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader \
        2>&1 | tee -a "$log" "$summary"
else
    say "nvidia-smi: not on this machine" | tee -a "$summary"
fi
# Versions from the installed packages' metadata: importing torch here would cost seconds. Every
# result file's first line repeats them with the device's properties, as torch sees it.
versions='import importlib.metadata as m, platform
print(f"python {platform.python_version()}", *(f"{p} {m.version(p)}" for p in ("torch", "triton")), sep=", ")'
if ! timeout 60 "$py" -c "$versions" 2>&1 | tee -a "$log" "$summary"; then
    say "gpu_check.sh: $py cannot report torch's and triton's versions (above); no stage was run"
    exit 1
fi

run_stage a a_kernel.txt "kernel correctness, compiled" \
    "$py" assets/gpu_check.py kernel --out "$out/a_kernel.txt" $flag
run_stage b b_step.txt "DiT-S/2 training step, triton against sdpa" \
    "$py" assets/gpu_check.py step --out "$out/b_step.txt" $flag
run_stage c c_attention.md "attention kernel table" \
    "$py" assets/benchmark_attention.py --autotune quick --out "$out/c_attention.md" $flag
run_stage d d_train.md "train.py --benchmark rows" \
    "$py" assets/gpu_check.py train --out "$out/d_train.md" --seconds "$(budget d)" $flag
run_stage e e_preset.txt "short --preset gpu run and its samples" \
    "$py" assets/gpu_check.py preset --out "$out/e_preset.txt" --grid "$out/e_grid.png" --work "$work" $flag

rm -f "$out"/*.tmp   # a stage killed while rewriting its file leaves its last complete version
say ""
say "=== summary ($out/summary.txt) ==="
tee -a "$log" <"$summary"
exit $failed
