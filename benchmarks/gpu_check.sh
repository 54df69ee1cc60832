#!/usr/bin/env bash
# The GPU check: one command, one GPU, under 8 minutes, one table at the end.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; needs lightning_gen's dependencies and a CUDA GPU
#
# 1. SSL throughput, lightning_gen vs a bare PyTorch loop (SimCLR, MoCo v2 x fp32/bf16 x channels_last;
#    SimCLR bf16 channels_last once more with trainer.compile);
# 2. the input pipeline on a generated 20k-JPEG ImageNet-like tree, GPU decoding (nvjpeg) included;
# 3. samplers (DDPM-1000, DDIM, rectified flow) of digits models trained here first (10 epochs: the
#    FIDs are not the 20-epoch ones of docs/results-digits.md; the time per image is what this measures).
# Each stage keeps its log and table in $OUT_DIR (default gpu_check/) and has a time limit in seconds
# (SSL_LIMIT, INPUT_LIMIT, SAMPLING_LIMIT; together under 8 minutes); a stage that runs out is reported
# and the others still run. The last table merges the stages' tables.
#
# The plumbing can be tried without a GPU, with tiny sizes (the numbers then mean nothing):
#   ALLOW_CPU=1 SSL_ARGS="--device cpu --steps 1 --warmup 1 --batch-size 32 --methods simclr" \
#   INPUT_ARGS="--images 200 --classes 10 --small 50 --batch 8 --batches 2 --workers 1" \
#   TRAIN_ARGS="trainer.max_epochs=1 trainer.limit_train_batches=2" SAMPLING_ARGS="--n 20 --batch 20 --skip-ddpm" \
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-gpu_check}
mkdir -p "$OUT_DIR"
LGEN="$PY -m lightning_gen"
RUN="logger.wandb.enabled=false trainer.enable_progress_bar=false runs_dir=$OUT_DIR/runs callbacks.fid.enabled=false"

if [ -z "${ALLOW_CPU:-}" ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU found')" || exit 1
fi
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")
started=$SECONDS

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, keep the output in $OUT_DIR/NAME.log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" bash -c "$*" > "$OUT_DIR/$name.log" 2>&1  # bash -c: the stages are shell functions
  rc=$?
  if [ $rc -eq 124 ]; then
    echo "   $name: stopped at its ${limit} s limit" | tee -a "$OUT_DIR/$name.log"
  elif [ $rc -ne 0 ]; then
    echo "   $name: failed (exit $rc); the end of $OUT_DIR/$name.log:"
    tail -5 "$OUT_DIR/$name.log"
  fi
  echo "   $name: done at $((SECONDS - started)) s"
}

ssl() {
  $PY benchmarks/ssl_throughput.py ${SSL_ARGS:---steps 20 --warmup 5}
  $PY benchmarks/ssl_throughput.py ${SSL_ARGS:---steps 20 --warmup 10} --methods simclr \
    --precisions bf16-mixed --channels-last true --compile true
}
sampling() {
  local extractor="$OUT_DIR/digits_16px.pt"
  [ -f "$extractor" ] || $LGEN fid-extractor data=digits data.image_size=16 epochs=5 out="$extractor" || return 1
  for m in ddpm flow; do
    $LGEN train experiment=${m}_digits run_id=gpu $RUN ${TRAIN_ARGS:-trainer.max_epochs=10} || return 1
  done
  $PY benchmarks/sampling.py --ddpm "$OUT_DIR/runs/ddpm_digits/gpu/checkpoints/last.ckpt" \
    --flow "$OUT_DIR/runs/flow_digits/gpu/checkpoints/last.ckpt" --extractor "$extractor" --ddim-steps 10 50 \
    --flow-steps 10 50 ${SAMPLING_ARGS:---n 500 --batch 500}
}
export -f ssl sampling
export PY LGEN RUN OUT_DIR
export SSL_ARGS INPUT_ARGS TRAIN_ARGS SAMPLING_ARGS 2>/dev/null || true
stage ssl_throughput "${SSL_LIMIT:-190}" ssl
stage input_pipeline "${INPUT_LIMIT:-140}" $PY benchmarks/input_pipeline.py --gpu --root "$OUT_DIR/input_pipeline_data" \
  ${INPUT_ARGS:---workers 8 --batch 128 --batches 10}
stage sampling "${SAMPLING_LIMIT:-120}" sampling

echo
echo "# GPU check on $DEVICE: $((SECONDS - started)) s"
$PY - "$OUT_DIR" <<'EOF'
import sys
from pathlib import Path

# columns that name the case in each stage's table; the others are results
CASE_COLUMNS = {"ssl_throughput": 4, "input_pipeline": 2, "sampling": 2}
print("| benchmark | case | results |")
print("|---|---|---|")
for name, k in CASE_COLUMNS.items():
    log = Path(sys.argv[1]) / f"{name}.log"
    lines = log.read_text().splitlines() if log.exists() else []
    header, found = None, False
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set("".join(cells)) <= set("-: "):  # the |---| line
            continue
        if cells[0] in ("method", "path", "model"):
            header = cells
            continue
        if header is None:
            continue
        results = "; ".join(f"{h}: {v}" for h, v in zip(header[k:], cells[k:]) if v)
        print(f"| {name} | {' / '.join(c for c in cells[:k] if c)} | {results} |")
        found = True
    if not found:
        print(f"| {name} | no table: see {log} | |")
EOF
