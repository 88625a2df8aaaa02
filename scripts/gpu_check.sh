#!/usr/bin/env bash
# The first thing to run when a GPU is lent (docs/gpu.md): about 5-8 minutes on one GPU.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--device cuda|cuda:N]
#
# Checks, each with a time limit, in this order: the environment (torch, CUDA, cuDNN, GPU); the
# CUDA twins of the tests (pytest -m cuda); a smoke run of every pruner, and of K-prune with bf16 and
# fp16 autocast; the same run twice with deterministic=true (masks and safetensors compared); a run
# SIGKILLed after two sub-layers and resumed (compared with the uninterrupted run); kprune eval,
# bench and finetune (a few steps); the benchmark harness (fast vs reference schedule, profile);
# K-prune on MiniLM-MRPC at 100K tokens in fp32, bf16 and bf16 with pruner.autocast_scope=all (needs
# ../shared or $KPRUNE_SHARED, else skipped) and on a random BERT-base at 100K tokens in fp32 and
# bf16-all (pruning time, stages, peak memory, keep decisions equal to fp32's). Prints a
# table and writes DIR/gpu_check.json (DIR defaults to gpu-check/), the logs beside it. Exit status
# 1 if any check failed.
#
# --dry-run: everything on the CPU at tiny sizes (about 2-4 minutes on 2 cores), to test the script.
# Runs in the current python ($PYTHON, default python). If kprune's dependencies are missing it
# installs the project (pip install -e .[dev,deploy]) with torch pinned to the installed version,
# so a CUDA build of torch is never replaced.
set -u
cd "$(dirname "$0")/.."

DRY=0
OUT=gpu-check
DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --device) DEVICE="$2"; shift ;;
        *) echo "usage: scripts/gpu_check.sh [--dry-run] [--out DIR] [--device cuda|cuda:N]" >&2; exit 2 ;;
    esac
    shift
done
[ "$DRY" = 1 ] && DEVICE=cpu
PY=${PYTHON:-python}
KPRUNE="$PY -m kprune_cli"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
rm -rf "$OUT"/*.detail "$OUT"/smoke-* "$OUT"/deterministic-* "$OUT"/resumed "$OUT"/uninterrupted "$OUT"/finetuned
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SHARED=${KPRUNE_SHARED:-$(cd .. && pwd)/shared}
LIMIT=300
if [ "$DRY" = 1 ]; then TOKENS=1000; else TOKENS=100000; fi

# check NAME LIMIT_S COMMAND...: run COMMAND (output in OUT/NAME.log), record ok/FAIL and seconds;
# a line the command writes to OUT/NAME.detail becomes the row's detail.
check() {
    local name=$1 limit=$2 start status tenths
    shift 2
    start=$(date +%s%N)
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="FAIL (exit $?)"; fi
    tenths=$(( ($(date +%s%N) - start) / 100000000 ))
    printf '%s\t%s\t%d.%d\t%s\n' "$name" "$status" $((tenths / 10)) $((tenths % 10)) \
        "$(head -c 300 "$OUT/$name.detail" 2>/dev/null)" >> "$RESULTS"
    printf '%-24s %s\n' "$name" "$status"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$RESULTS"; printf '%-24s skipped: %s\n' "$1" "$2"; }

# --- the project installed (never touching torch)
if ! $PY -c "import kprune_cli.cli.run, pytest" 2>/dev/null; then
    echo "torch==$($PY -c 'import torch; print(torch.__version__)')" > "$OUT/constraints.txt"
    $PY -m pip install -q -e ".[dev,deploy]" -c "$OUT/constraints.txt" \
        || $PY -m pip install -q --no-deps --no-build-isolation -e . \
        || { echo "cannot install kprune's dependencies into $PY" >&2; exit 2; }
fi

# --- environment
check environment 60 $PY - "$OUT/environment.json" "$DEVICE" <<'EOF'
import json, sys
import torch, transformers
device = sys.argv[2]
facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available to this torch (a CPU build?): see docs/gpu.md")
    facts |= {"gpu": torch.cuda.get_device_name(torch.device(device)),
              "capability": ".".join(map(str, torch.cuda.get_device_capability(torch.device(device)))),
              "memory_gib": round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)}
json.dump(facts, open(sys.argv[1], "w"), indent=1)
open(sys.argv[1].replace("environment.json", "environment.detail"), "w").write(
    " ".join(f"{k}={v}" for k, v in facts.items()))
EOF
if grep -q "^environment	FAIL" "$RESULTS"; then cat "$OUT/environment.log"; exit 1; fi

# --- models and data: the shared MiniLM-MRPC when present, else a tiny BERT on tiny MRPC-shaped data
if [ "$DRY" = 0 ] && [ -d "$SHARED/models/minilm-mrpc" ] && [ -d "$SHARED/data/glue/mrpc" ]; then
    MODEL="$SHARED/models/minilm-mrpc"; DATA="$SHARED/data/glue/mrpc"
else
    MODEL="$OUT/tiny-bert-mrpc"; DATA="$OUT/tiny-mrpc"
    $PY - "$MODEL" "$DATA" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_mrpc_data, write_tiny_checkpoint
write_tiny_checkpoint(Path(sys.argv[1]))
write_mrpc_data(Path(sys.argv[2]))
EOF
fi
RUN="run task=mrpc model.path=$MODEL data_dir=$DATA device=$DEVICE preset=smoke"

# --- tests with a CUDA twin
if [ "$DRY" = 0 ]; then
    check pytest-cuda 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cli.py tests/test_resume.py \
        tests/test_kprune_fast.py tests/test_kprune_search.py tests/test_precision.py tests/test_reliability.py
else
    skip pytest-cuda "dry run (the CUDA twins skip without a GPU)"
fi

# --- smoke runs: every pruner in one sweep process, then K-prune's autocast precisions
check smoke-pruners "$LIMIT" $KPRUNE $RUN -m pruner=kprune,kwon,magnitude,random output_dir="$OUT/smoke-pruners"
check smoke-autocast "$LIMIT" $KPRUNE $RUN -m pruner=kprune pruner.autocast=bf16,fp16 output_dir="$OUT/smoke-autocast"

# --- determinism: the same run twice with deterministic=true
check deterministic "$LIMIT" bash -c "
    for run in a b; do $KPRUNE $RUN deterministic=true output_dir=$OUT/deterministic-\$run || exit 1; done
    $PY - $OUT <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
reports = [json.loads((out / f'deterministic-{run}' / 'report.json').read_text()) for run in 'ab']
weights = [load_file(out / f'deterministic-{run}' / 'pruned' / 'model.safetensors') for run in 'ab']
same_layers = reports[0]['layers'] == reports[1]['layers']
differing = [name for name in weights[0] if not weights[0][name].equal(weights[1][name])]
(out / 'deterministic.detail').write_text(f'masks equal: {same_layers}; tensors differing: {len(differing)}')
sys.exit(0 if same_layers and not differing else 1)
EOF"

# --- kill -9 after two sub-layers, resume, compare with the uninterrupted run (the tests' killing harness)
check kill-and-resume "$LIMIT" bash -c "
    killing=\$($PY -c 'import sys; sys.path[:0] = [\"tests\"]; from test_resume import KILLING_RUN; print(KILLING_RUN)')
    KILL_AT=state-rename:3 $PY -c \"\$killing\" $RUN output_dir=$OUT/resumed; echo \"killed: exit \$?\"
    $KPRUNE $RUN output_dir=$OUT/resumed resume=true || exit 1
    $KPRUNE $RUN output_dir=$OUT/uninterrupted || exit 1
    $PY - $OUT <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
resumed, plain = (json.loads((out / name / 'report.json').read_text()) for name in ('resumed', 'uninterrupted'))
notes = [note for note in resumed['notes'] if note.startswith('resumed at sub-layer')]
weights = [load_file(out / name / 'pruned' / 'model.safetensors') for name in ('resumed', 'uninterrupted')]
differing = [name for name in weights[0] if not weights[0][name].equal(weights[1][name])]
same = resumed['layers'] == plain['layers'] and not differing and len(notes) == 1
(out / 'kill-and-resume.detail').write_text(f'{notes[0] if notes else \"did not resume\"}; '
                                            f'masks equal: {resumed[\"layers\"] == plain[\"layers\"]}; '
                                            f'tensors differing: {len(differing)}')
sys.exit(0 if same else 1)
EOF"

# --- the other commands
PRUNED="$OUT/smoke-pruners/0-mrpc-kprune-r0.5-s0/pruned"
check eval 120 $KPRUNE eval task=mrpc checkpoint="$PRUNED" data_dir="$DATA" device="$DEVICE" eval_max_examples=200
check bench 120 $KPRUNE bench task=mrpc checkpoint="$PRUNED" dense="$MODEL" device="$DEVICE" onnx=false \
    batch_sizes=[1,32] dtype=bf16
check finetune 180 $KPRUNE finetune task=mrpc model=custom model.path="$MODEL" data_dir="$DATA" device="$DEVICE" \
    max_steps=20 batch_size=16 gradient_accumulation_steps=2 output_dir="$OUT/finetuned" overwrite=true

# --- the benchmark harness: fast vs reference schedule (asserts agreement), profile
if [ "$DRY" = 0 ]; then
    check benchmarks 300 $PY -m benchmarks --quick --device "$DEVICE" --sections pruning,profile --out "$OUT/bench.json"
else
    skip benchmarks "dry run (minutes on a CPU)"
fi

# --- timings: K-prune's pruning at TOKENS tokens, one process (each case loaded once); a row per run
if [ "$DRY" = 1 ] || [ -d "$SHARED/models/minilm-mrpc" ]; then
    CASES="minilm:fp32,minilm:bf16,minilm:bf16-all,bert-base:fp32,bert-base:bf16-all"; else
    skip minilm "no $SHARED/models/minilm-mrpc (set KPRUNE_SHARED)"; CASES="bert-base:fp32,bert-base:bf16-all"; fi
check timings "$((2 * LIMIT))" $PY - "$RESULTS" "$CASES" "$DEVICE" "$TOKENS" "$DRY" "$SHARED" <<'EOF'
import copy, json, sys, time
from pathlib import Path
import torch
from benchmarks.cases import BERT_BASE_SHAPE, MINILM_SHAPE, minilm_mrpc, random_case
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.memory import peak_memory_mb, reset_peak_memory
results, cases, device, tokens, dry, shared = sys.argv[1:7]
device, tokens, dry = torch.device(device), int(tokens), dry == "1"
TINY = {"num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 384}
loaded, float32_keep = {}, {}
for name, precision in (item.split(":") for item in cases.split(",")):
    # fp32 | bf16 (measurement passes) | bf16-all (pruner.autocast_scope=all: the teacher's and KPWT's passes too)
    autocast, _, scope = precision.partition("-")
    if name not in loaded:  # MiniLM-MRPC from the shared model and data; BERT-base random (tiny in a dry run)
        loaded[name] = (random_case(name, tokens, **{**MINILM_SHAPE, **TINY}) if dry and name == "minilm"
                        else minilm_mrpc(tokens, shared_dir=Path(shared)) if name == "minilm"
                        else random_case(name, tokens, **({**BERT_BASE_SHAPE, **TINY} if dry else BERT_BASE_SHAPE)))
    case = copy.deepcopy(loaded[name])
    problem = case.problem(device)
    reset_peak_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = KPrunePruner(autocast=False if autocast == "fp32" else autocast,
                          autocast_scope="all" if scope else "measure").prune(problem)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stages = ", ".join(f"{stage} {value:.1f}" for stage, value in result.timing.items())
    keep = torch.cat(result.masks.heads + result.masks.neurons).cpu() != 0
    float32_keep.setdefault(name, keep)  # the fp32 row comes first: later rows say how many units they keep alike
    agree = f"; keep decisions equal to fp32's: {100 * float((keep == float32_keep[name]).float().mean()):.1f}%"
    detail = (f"{case.sample.num_tokens} tokens ({case.source}); {stages}; peak {peak_memory_mb(device):.0f} MB"
              + (agree if precision != "fp32" else "") + "".join(f"; note: {note}" for note in result.notes))
    print(json.dumps({"case": name, "precision": precision, "seconds": seconds, "detail": detail}), flush=True)
    with open(results, "a") as rows:
        rows.write(f"  {name}-{precision}\tok\t{seconds:.1f}\t{detail[:300]}\n")
    del case, problem
EOF

# --- the table and the JSON
$PY - "$RESULTS" "$OUT" "$DEVICE" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
results, out, device, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
rows = [dict(zip(("check", "status", "seconds", "detail"), line.split("\t"))) for line in results.read_text().splitlines()]
for row in rows:
    row["seconds"] = float(row["seconds"])
environment = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
(out / "gpu_check.json").write_text(json.dumps({"device": device, "dry_run": dry, "environment": environment,
                                                "checks": rows}, indent=1) + "\n")
width = max(len(row["check"]) for row in rows)
print(f"\n{'check':<{width}}  {'status':<14} {'s':>6}  detail")
for row in rows:
    print(f"{row['check']:<{width}}  {row['status']:<14} {row['seconds']:>6.1f}  {row['detail']}")
print(f"\n{out / 'gpu_check.json'} (logs: {out}/<check>.log)")
sys.exit(1 if any(row["status"].startswith("FAIL") for row in rows) else 0)
EOF
