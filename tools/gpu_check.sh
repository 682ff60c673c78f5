#!/usr/bin/env bash
# One-GPU check of the whole path on a CUDA machine: bf16 correctness and throughput / MFU
# (tools/bench_gpu.py), then pre-training with the deepspeed launcher in bf16 + ZeRO-2 (a first launch,
# then a relaunch that resumes from its checkpoint), evaluation of every task on the GPU, and export.
#
#     bash tools/gpu_check.sh SHARDS TOKENIZER OUT [SECONDS_PER_STAGE]
#
# SHARDS: make_shards output (224 px); TOKENIZER: a local fast-tokenizer folder; OUT: the stage logs go here, the
# run (checkpoints, TensorBoard, evaluation, export) to RUN_DIR (default OUT/run).
# Every stage runs under `timeout`; the script goes on after a failed stage and exits non-zero at the end.
# CONFIG (default mlip_dist/configs/gpu_check.yaml), BENCH_ARGS (extra tools/bench_gpu.py arguments) and
# TRAINER_BENCH_ARGS (tools/bench_trainer.py's, default: paper preset, bf16, batch 128, 6 loader workers) make
# a quick CPU dry run possible (SKIP_BENCH=1 leaves the benchmark out), e.g. CONFIG=tiny.yaml FIRST_STEPS=4 RESUME_STEPS=6 BENCH_ARGS="--preset tiny --batch 4 --device cpu".
set -u
mkdir -p "$3"
shards=$(realpath "$1") tokenizer=$(realpath "$2") out=$(realpath "$3") limit=${4:-240}
repo=$(cd "$(dirname "$0")/.." && pwd)
config=${CONFIG:-$repo/mlip_dist/configs/gpu_check.yaml}
cd "$repo"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()
stage() {  # stage NAME COMMAND...: run with a time limit, log to $out/NAME.log, note a failure
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || { failed+=("$name"); tail -n 25 "$out/$name.log"; }
    return $rc
}
vocab=$(python3 -c "import sys; from transformers import AutoTokenizer; print(len(AutoTokenizer.from_pretrained(sys.argv[1])))" "$tokenizer")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, deepspeed, transformers, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"

[ -n "${SKIP_BENCH:-}" ] || { stage bench python3 "$repo/tools/bench_gpu.py" ${BENCH_ARGS:-} && cat "$out/bench.log"; }
# Issue 17: the trainer's loop body (loader, prefetch, engine) against the bare step, paper preset, bf16, batch 128.
[ -n "${SKIP_BENCH:-}" ] || { stage bench_trainer python3 "$repo/tools/bench_trainer.py" --shards "$shards" \
    --tokenizer "$tokenizer" ${TRAINER_BENCH_ARGS:---preset paper --batch 128 --precision bf16 --workers 6} \
    && cat "$out/bench_trainer.log"; }

run=$(realpath -m "${RUN_DIR:-$out/run}")
train=("$repo/mlip_dist/pretrain.py"
       --config "$config" --deepspeed_config "$repo/ds_configs/zero2.json"
       --data.shards "$shards" --model.text.tokenizer "$tokenizer" --model.text.vocab_size "$vocab"
       --train.output_dir "$run" ${TRAIN_ARGS:-})
launcher=(python3 -m deepspeed.launcher.runner --num_gpus 1)
stage pretrain "${launcher[@]}" --master_port 29561 "${train[@]}" --train.max_steps ${FIRST_STEPS:-40}
stage resume "${launcher[@]}" --master_port 29562 "${train[@]}" --train.max_steps ${RESUME_STEPS:-60}
grep -E "resumed from|training:|bf16" "$out/resume.log" | head -5
[ -f "$run/train_summary.json" ] && python3 -c "
import json, sys
s = json.load(open(sys.argv[1]))
h = s['loss_history']
print('train_summary:', {k: v for k, v in s.items() if k != 'loss_history'})
print('loss first/last:', h[0], h[-1], 'entries', len(h))" "$run/train_summary.json"
python3 - "$run/tensorboard" <<'PY' || true
import statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ev = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0}).Reload()
for tag in ("time/step_s", "time/data_wait_s", "time/forward_s", "time/backward_step_s", "throughput/samples_per_s",
            "memory/peak_gib", "loss/total", "ot/marginal_error"):
    if tag in ev.Tags()["scalars"]:
        values = [e.value for e in ev.Scalars(tag)]
        print(f"{tag}: median {statistics.median(values[1:] or values):.4g} of {len(values)}: "
              + " ".join(f"{v:.3g}" for v in values[:30]))
print("images:", ev.Tags()["images"][:4])
PY

stage evaluate python3 "$repo/mlip_dist/evaluate.py" --checkpoint "$run" --data "$shards" --task all --no-progress \
    --out "$run/eval" && cat "$run/eval/results.md"
stage export python3 -m mlip_dist.export --checkpoint "$run" --out "$run/export" --overwrite && ls "$run/export"

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all stages passed"
