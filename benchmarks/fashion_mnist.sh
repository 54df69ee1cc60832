#!/usr/bin/env bash
# Reproduces docs/results-fashion-mnist.md: every *_fashion_mnist experiment, one after the other, then the
# representation table (+ online-probe curves) and the generator table (+ sample grids).
#
#   bash benchmarks/fashion_mnist.sh                      # everything (hours on a 2-core CPU)
#   EXPERIMENTS="simclr moco_v2" bash benchmarks/fashion_mnist.sh
#   SKIP_TRAIN=1 bash benchmarks/fashion_mnist.sh         # only the two result scripts, on existing runs
#   SKIP_RESULTS=1 EXPERIMENTS=vae bash benchmarks/fashion_mnist.sh   # only train
#
# Needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist (or the torchvision copy under data/).
# One thread per process (OMP_NUM_THREADS=1, as measured on the page); each run's log goes to
# runs/fashion_mnist_logs/, its wall and CPU time (user + system) to runs/fashion_mnist_times.txt.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LGEN="python -m lightning_gen"
RUN="run_id=${RUN_ID:-final} logger.wandb.enabled=false trainer.enable_progress_bar=false"
SSL="simclr moco_v2 moco_v3 dino mae rotation supervised"
GENERATORS="vae gan ddpm_cfg flow pixelcnn"
mkdir -p runs/fashion_mnist_logs docs/images
# the Fashion-MNIST FID extractor at 16 px, built once into the per-user cache (training would also build it)
extractor() {
  python -c "from lightning_gen.eval.fid_extractor import default_path, ensure_extractor as e; e('fashion_mnist', 16, default_path('fashion_mnist', 16))"
}
if [ -z "${SKIP_TRAIN:-}" ]; then
  for e in ${EXPERIMENTS:-$SSL $GENERATORS}; do
    [[ " $GENERATORS " != *" $e "* ]] || extractor
    TIMEFORMAT="${e}_fashion_mnist: %R s wall, %U s user, %S s system"
    { time $LGEN train experiment=${e}_fashion_mnist $RUN "$@" >runs/fashion_mnist_logs/$e.log 2>&1; } \
      2>>runs/fashion_mnist_times.txt
    tail -1 runs/fashion_mnist_times.txt
  done
fi
[ -z "${SKIP_RESULTS:-}" ] || exit 0
ckpt() { echo runs/${1}_fashion_mnist/${RUN_ID:-final}/checkpoints/last.ckpt; }
python benchmarks/fashion_mnist_results.py $(for e in simclr moco_v2 moco_v3 dino mae rotation; do ckpt $e; done) \
  --supervised "$(ckpt supervised)" --plots docs/images --out runs/fashion_mnist_results.json
extractor
python benchmarks/fashion_mnist_generators.py $(for e in $GENERATORS; do ckpt $e; done) \
  --n 5000 --guidance 0 1 3 --grids docs/images --out runs/fashion_mnist_generators.json
python benchmarks/fashion_mnist_gen_metrics.py $(for e in $GENERATORS; do ckpt $e; done) \
  --n 10000 --grids docs/images --out runs/fashion_mnist_gen_metrics.json
