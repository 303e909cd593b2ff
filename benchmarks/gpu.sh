#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, in one run of under 8 minutes on one H200:
#   1. training, PLM-1.8B, bf16: tokens/s, MFU and peak memory at seq 4096 (batch 2) and 2048
#      (batch 4), the optimized path (flash attention with V padded, per-block compile, chunked
#      loss, fused AdamW) beside the plain eager baseline, plus an attention-kernel table;
#   2. decode, PLM-1.8B, bf16: the static latent-cache decoder (compiled, one CUDA graph per
#      step) at batch 1, 8 and 32 with 1024 and 4000 tokens of context, % of the HBM roofline,
#      peak memory, the reference model's eager decode, and greedy checks against the reference.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default runs/gpu
#
# Writes OUT_DIR/summary.md (every table, the targets met or not), OUT_DIR/summary.json (all
# figures) and OUT_DIR/gpu.log (everything printed). Installs nothing: it needs a python with a
# CUDA build of torch ($PYTHON, else python3) and this checkout (on PYTHONPATH, no install).
# Each stage has a time limit; a stage that runs out keeps the rows it finished.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/runs/gpu}"
PY="${PYTHON:-python3}"
BUDGET="${PLM_GPU_BUDGET_S:-465}"  # seconds for all stages together (the run's limit is 8 minutes)
# PLM_GPU_SELFTEST=1: the same stages on the CPU at toy sizes (tests/test_gpu_paths.py checks the
# script's plumbing that way; the figures mean nothing)
SELFTEST="${PLM_GPU_SELFTEST:-0}"
if [[ "$SELFTEST" == 1 ]]; then
    DEV=cpu PRESET=plm-micro
    TRAIN=(--preset plm-micro --steps 1 --warmup 1 --compile none)
    SEQS=("32 2 seq4096" "16 2 seq2048")
    DECODE=(--preset plm-micro --vocab-size 512 --batch 1,2 --ctx 16 --steps 2 --warmup 1 --host-steps 2
            --check-steps 4 --baseline-steps 2)
else
    DEV=cuda PRESET=plm-1.8b
    TRAIN=(--preset plm-1.8b --steps 6 --warmup 3)
    SEQS=("4096 2 seq4096" "2048 4 seq2048")  # seq, batch (8192 tokens a step), tag
    DECODE=(--preset plm-1.8b --batch 1,8,32 --ctx 1024,4000 --steps 64)
fi

fail() { echo "benchmarks/gpu.sh: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no python: '$PY' not found (set PYTHON to a python with a CUDA build of torch)"
why="$("$PY" - "$SELFTEST" <<'EOF' 2>&1
import sys
try:
    import torch
except Exception as e:  # noqa: BLE001
    print(f"'{sys.executable}' cannot import torch ({type(e).__name__}: {e})"); sys.exit(1)
if not torch.cuda.is_available() and sys.argv[1] != "1":
    print(f"no CUDA device: torch {torch.__version__} at '{sys.executable}' reports torch.cuda.is_available() "
          f"False (built for CUDA: {torch.version.cuda or 'no, a CPU-only build'}). These checks need an NVIDIA "
          "GPU and a CUDA build of torch; nothing was run.")
    sys.exit(1)
EOF
)" || fail "$why"

mkdir -p "$OUT" || fail "cannot create $OUT"
PARTS="$OUT/parts"
rm -rf "$PARTS" && mkdir -p "$PARTS"
LOG="$OUT/gpu.log"
: > "$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES="$PARTS/stages.tsv"
: > "$STAGES"
start=$SECONDS

# stage NAME CAP_SECONDS CMD...: run CMD under min(CAP, time left), output to the log
stage() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - start)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$STAGES"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STAGES"
}

cd "$REPO" || exit 2
"$PY" - > "$PARTS/env.json" 2>> "$LOG" <<'EOF'
import json, platform, shutil, subprocess, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
       "python": platform.python_version(), "gpu": "none (self-test on the CPU)", "memory_gib": 0}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count)
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True)
    env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
print(json.dumps(env))
EOF

caps=(150 110)
for i in "${!SEQS[@]}"; do
    read -r seq batch tag <<< "${SEQS[$i]}"
    stage "train-$tag" "${caps[$i]}" "$PY" benchmarks/train_throughput.py --device "$DEV" "${TRAIN[@]}" \
        --seq-len "$seq" --batch "$batch" --tag "$tag" --out "$PARTS"
done
stage decode 200 "$PY" benchmarks/decode_throughput.py --device "$DEV" "${DECODE[@]}" --out "$PARTS"

# one summary from the parts (all of it: the parts folder is removed, so at most 3 files remain)
"$PY" - "$OUT" "$PARTS" "$((SECONDS - start))" "$PRESET-$DEV" <<'EOF' 2>> "$LOG"
import json, sys, time
from pathlib import Path
out, parts, seconds, key = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def load(name):
    p = parts / name
    return json.loads(p.read_text()) if p.exists() else None
def md(name):
    p = parts / name
    return p.read_text() if p.exists() else f"(no result: see gpu.log)\n"
env = load("env.json") or {}
stages = [dict(zip(("stage", "exit", "seconds"), l.split("\t"))) for l in (parts / "stages.tsv").read_text().splitlines()]
train = {s: load(f"train_throughput-{key}-{s}.json") for s in ("seq4096", "seq2048")}
decode = load(f"decode_throughput-{key}.json")
targets = {}
t4 = train["seq4096"]
if t4 and t4["rows"] and "mfu" in t4["rows"][0]:
    targets["training MFU >= 45% (PLM-1.8B, seq 4096, bf16)"] = {"value": t4["rows"][0]["mfu"], "met": t4["rows"][0]["mfu"] >= 0.45}
for k, v in ((decode or {}).get("targets") or {}).items():
    targets[k] = v
summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": seconds, "env": env, "stages": stages,
           "targets": targets, "train": train, "decode": decode}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
lines = ["# GPU checks (benchmarks/gpu.sh)", "",
         f"{env.get('gpu', '?')}, {env.get('memory_gib', 0):.0f} GiB, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
         f"cuDNN {env.get('cudnn')}; {summary['date']}; {seconds} s in all.", "",
         "| stage | exit | seconds |", "|---|---|---:|"]
lines += [f"| {s['stage']} | {s['exit']} | {s['seconds']} |" for s in stages]
lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
for k, v in targets.items():
    val = f"{v['value']:.1%}" if "%" in k else f"{v['value']:.2f}x"
    lines.append(f"| {k} | {val} | {'yes' if v['met'] else 'NO'} |")
if not targets:
    lines.append("| (no target could be evaluated: see gpu.log) | | |")
lines += ["", "## Training", "", md(f"train_throughput-{key}-seq4096.md"), md(f"train_throughput-{key}-seq2048.md"),
          "## Decode", "", md(f"decode_throughput-{key}.md")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rc=$?
rm -rf "$PARTS"
echo "benchmarks/gpu.sh: $((SECONDS - start)) s; $OUT/summary.md, $OUT/summary.json, $OUT/gpu.log"
exit $rc
