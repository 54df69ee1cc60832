#!/usr/bin/env bash
# Reproduces the generators' table of docs/results-digits.md: one run per method (the first builds the cached
# FID feature extractor), FID, sample grids,
# and the sampler benchmark. Usage: bash benchmarks/digits_generators.sh [extra overrides for every run]
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# small tensors: one thread per process avoids thread-pool thrashing on a shared CPU (set it higher on your own box)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LGEN="python -m lightning_gen"
RUN="run_id=readme logger.wandb.enabled=false trainer.enable_progress_bar=false"
mkdir -p docs/images
for m in ${METHODS:-vae gan pixelcnn ddpm flow}; do
  $LGEN train experiment=${m}_digits $RUN "$@" 2>&1 | grep -E "^\[fid\]|^\[lgen\]|seconds|fid_digits|Error" || true
  # the image-grid callback's last grid (real digits on top, then samples with fixed noise)
  cp "$(ls runs/${m}_digits/readme/samples/real_samples*.png | tail -1)" docs/images/generative_${m}_digits.png
done
python benchmarks/sampling.py --ddpm runs/ddpm_digits/readme/checkpoints/last.ckpt \
  --flow runs/flow_digits/readme/checkpoints/last.ckpt --n 200 --batch 200
