#!/usr/bin/env bash
# Every GPU figure of issue 19 in one run of at most 10 minutes on one H200 (each step under its own timeout):
#   bash benchmarks/gpu_check.sh [OFFICIAL_DIR]
# OFFICIAL_DIR: a checkout of github.com/sandyresearch/parcae; the `official` row then times the authors' own code
# (without it: the benchmark's emulation of the official execution). Logs go to $OUT (default ./gpu-out), one per
# step, and summary.txt collects every step's command, exit status, seconds and last lines.
# Environment: PYTHON (default python) with a CUDA build of torch; run from the repository root.
set -u
OUT=${OUT:-./gpu-out}
PY=${PYTHON:-python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
OFFICIAL=()
if [ $# -ge 1 ]; then
    OFFICIAL=(--official "$1")
fi

step() {  # step NAME SECONDS COMMAND...: run under `timeout`, log to $OUT/NAME.log, summarise
    local name=$1 limit=$2
    shift 2
    echo "== $name (timeout ${limit} s): $*" | tee -a "$SUMMARY"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc $rc, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    tail -n 14 "$OUT/$name.log" >>"$SUMMARY"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >>"$SUMMARY" 2>&1

# Training, parcae-140m at 32 × 2048, bf16 autocast, AdamW on every row. Compiled, 50 measured steps of freshly
# sampled depths: ms/step, tokens/s, useful-work MFU, peak CUDA memory per row, each row's cold start (first step)
# and the graphs compiled after warm-up (0 = no recompilation).
step train_compiled 235 "$PY" benchmarks/train_speed.py --device cuda --configs 140m --seq-len 2048 --compile \
    --steps 50 --warmup 3 ${OFFICIAL[@]+"${OFFICIAL[@]}"}
step train_eager 55 "$PY" benchmarks/train_speed.py --device cuda --configs 140m --seq-len 2048 \
    --steps 5 --warmup 2 ${OFFICIAL[@]+"${OFFICIAL[@]}"}

# `parcae train --set compile=true` (Muon, the default optimizer) on a small generated corpus: its step throughput
# after warm-up, from metrics.jsonl (tokens / tok_per_s gives each logged step's elapsed time).
"$PY" - "$OUT/corpus.txt" <<'EOF'
import random, sys
words = [f"w{i}" for i in range(3000)]
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        f.write(" ".join(rng.choice(words) for _ in range(200)) + "\n")
EOF
step train_cli_compiled 110 "$PY" -m parcae train --preset parcae-140m --data "$OUT/corpus.txt" --steps 16 \
    --batch-size 32 --seq-len 2048 --device cuda --set compile=true --set log_every=1 --set eval_batches=0 \
    --no-progress --out "$OUT/train-run" --overwrite
step train_cli_throughput 20 "$PY" - "$OUT/train-run/metrics.jsonl" <<'EOF'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "tok_per_s" in r and "event" not in r]
elapsed = [(r["step"], r["tokens"], r["tokens"] / r["tok_per_s"]) for r in rows]
(s0, t0, e0), (s1, t1, e1) = elapsed[5], elapsed[-1]  # after 5 warm-up steps (compilation)
print(f"parcae train, compiled, Muon: steps {s0}..{s1}: {(t1 - t0) / (e1 - e0):,.0f} tokens/s, "
      f"{1000 * (e1 - e0) / (s1 - s0):.1f} ms/step (first step {1000 * elapsed[0][2]:.0f} ms)")
EOF

# Muon's share of the step: the optimizer step alone on parcae-140m's parameters (Muon + AdamW, as `parcae train`
# builds it) next to AdamW alone; divide by the ms/step above.
step optimizer_step 45 "$PY" - <<'EOF'
import statistics, time, torch
from parcae import Parcae, get_preset
from parcae.train.config import TrainConfig
from parcae.train.optim import build_optimizer
model = Parcae(get_preset("parcae-140m")).cuda()
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
for name in ("muon", "adamw"):
    optimizer = build_optimizer(model, TrainConfig(optimizer=name))
    times = []
    for i in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"optimizer step {name}: {1000 * statistics.median(times[3:]):.1f} ms (median of 10 after 3 warm-up)")
EOF

# Decode. The project's benchmark (parcae-tiny vs gpt-tiny, random weights: latency, tokens/s, KV memory)...
step decode_benchmark 80 "$PY" benchmarks/inference.py --device cuda --dtype bfloat16 --new-tokens 256 \
    --repeats 1 --recompute-tokens 32 --json "$OUT/inference.json"
# ...and the 140M shapes of the issue: greedy, batch 1, prompt 32, 256 new tokens, bf16, with cached attention
# kept off cuDNN (the fix) and, for comparison, every SDPA backend allowed as before.
step decode_140m 50 "$PY" - <<'EOF'
import time, torch
from torch.nn.attention import SDPBackend
import parcae.model.parcae as parcae_model
from parcae import Parcae, get_preset
prompt = torch.randint(0, 256, (1, 32), device="cuda")
fix = list(parcae_model._CACHED_SDPA)
for label, backends in (("the fix: no cuDNN", fix), ("before: cuDNN allowed", [SDPBackend.CUDNN_ATTENTION, *fix])):
    parcae_model._CACHED_SDPA[:] = backends  # in place: `forward_cached`'s decorator holds this list
    for name in ("parcae-140m", "gpt-140m"):
        model = Parcae(get_preset(name)).to("cuda", torch.bfloat16).eval()
        model.generate(prompt, 16, temperature=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, 256, temperature=0)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / 256
        print(f"decode {name}, batch 1 ({label}): {ms:.2f} ms/token, {1000 / ms:.0f} tokens/s")
EOF
echo "done; logs in $OUT" | tee -a "$SUMMARY"
