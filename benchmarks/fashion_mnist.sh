#!/usr/bin/env bash
# Reproduces docs/results-fashion-mnist.md: every *_fashion_mnist experiment, one after the other; each
# self-supervised run is evaluated the moment it finishes and its row appended to
# benchmarks/results/fashion_mnist.jsonl (benchmarks/fashion_mnist_table.py turns the rows into the page's
# table, mean ± std over seeds, and the probe-vs-CPU-time plot); then the generators.
#
#   bash benchmarks/fashion_mnist.sh                        # everything: every SSL experiment with seed 0, SimCLR,
#                                                           # BYOL and the supervised baseline also with seeds 1, 2
#   bash benchmarks/fashion_mnist.sh --seeds 0,1,2 simclr byol    # these experiments, these seeds
#   COMMIT=1 bash benchmarks/fashion_mnist.sh               # git commit the rows after every finished row
#   SKIP_TRAIN=1 bash benchmarks/fashion_mnist.sh simclr    # evaluate existing runs only (no CPU time then)
#   SKIP_GENERATORS=1 ...                                   # the representation table only
#   TRAIN_ARGS="trainer.max_epochs=20" bash benchmarks/fashion_mnist.sh simclr   # extra overrides for training
#
# Needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist (or the torchvision copy under data/).
# One thread per process (OMP_NUM_THREADS=1, as measured on the page); each run's log goes to
# runs/fashion_mnist_logs/, its wall and CPU time (user + system) to runs/fashion_mnist_times.txt.
# colorization and split_brain predict colour from lightness: Fashion-MNIST is grey, so they have no row.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LGEN="python -m lightning_gen"
SSL="simclr moco_v1 moco_v2 moco_v3 dino cpc byol simsiam barlow_twins vicreg swav mae rotation relative_patch jigsaw inpainting supervised"
SEEDED="simclr byol supervised"  # the rows with 3 seeds by default
GENERATORS="vae gan ddpm_cfg flow pixelcnn"
ROWS=${ROWS:-benchmarks/results/fashion_mnist.jsonl}
TABLE=${ROWS%.jsonl}_table.md
PLOT=docs/images/fashion_mnist_probe_vs_cpu.png
PAGE=docs/results-fashion-mnist.md

SEEDS=""
if [ "${1:-}" = "--seeds" ]; then SEEDS=${2//,/ }; shift 2; fi
EXPERIMENTS=${*:-$SSL}
mkdir -p runs/fashion_mnist_logs docs/images "$(dirname "$ROWS")"
touch "$ROWS"

refresh() {  # the table (also into the page) and the plot from every row so far; COMMIT=1: one commit per row
  python benchmarks/fashion_mnist_table.py "$ROWS" --plot "$PLOT" --page "$PAGE" >"$TABLE"
  if [ -n "${COMMIT:-}" ]; then
    git add "$ROWS" "$TABLE" "$PLOT" "$PAGE" docs/images/fashion_mnist_*_curves.png && git commit -q -m "benchmarks/results/fashion_mnist: $1" || true
  fi
}

if ! grep -q '"kind": "raw pixels"' "$ROWS"; then
  python benchmarks/fashion_mnist_results.py --append "$ROWS" && refresh "raw pixels"
fi

for e in $EXPERIMENTS; do
  seeds=${SEEDS:-$([[ " $SEEDED " == *" $e "* ]] && echo "0 1 2" || echo 0)}
  for seed in $seeds; do
    ckpt=runs/${e}_fashion_mnist/s${seed}/checkpoints/last.ckpt
    cpu=()
    if [ -z "${SKIP_TRAIN:-}" ]; then
      TIMEFORMAT="%R %U %S"
      times=$( { time $LGEN train experiment=${e}_fashion_mnist seed=$seed run_id=s$seed \
        logger.wandb.enabled=false trainer.enable_progress_bar=false ${TRAIN_ARGS:-} \
        >runs/fashion_mnist_logs/${e}_s$seed.log 2>&1; } 2>&1 )
      read -r wall user system <<<"$times"
      echo "${e}_fashion_mnist seed $seed: $wall s wall, $user s user, $system s system" | tee -a runs/fashion_mnist_times.txt
      cpu=(--cpu-seconds "$(python -c "print($user + $system)")")
    fi
    args=(--append "$ROWS" --no-pixels "${cpu[@]}")
    [ "$seed" = 0 ] && args+=(--plots docs/images) || args+=(--no-random)
    if [ "$e" = supervised ]; then
      python benchmarks/fashion_mnist_results.py --supervised "$ckpt" "${args[@]}"
    else
      python benchmarks/fashion_mnist_results.py "$ckpt" "${args[@]}"
    fi
    refresh "${e}_fashion_mnist seed $seed"
  done
done
cat "$TABLE"

[ -z "${SKIP_GENERATORS:-}" ] || exit 0
# the Fashion-MNIST FID extractor at 16 px, built once into the per-user cache (training would also build it)
python -c "from lightning_gen.eval.fid_extractor import default_path, ensure_extractor as e; e('fashion_mnist', 16, default_path('fashion_mnist', 16))"
for e in $GENERATORS; do
  if [ -z "${SKIP_TRAIN:-}" ]; then
    TIMEFORMAT="${e}_fashion_mnist: %R s wall, %U s user, %S s system"
    { time $LGEN train experiment=${e}_fashion_mnist run_id=final logger.wandb.enabled=false \
      trainer.enable_progress_bar=false >runs/fashion_mnist_logs/$e.log 2>&1; } 2>>runs/fashion_mnist_times.txt
    tail -1 runs/fashion_mnist_times.txt
  fi
done
CKPTS=$(for e in $GENERATORS; do echo runs/${e}_fashion_mnist/final/checkpoints/last.ckpt; done)
python benchmarks/fashion_mnist_generators.py $CKPTS \
  --n 5000 --guidance 0 1 3 --grids docs/images --out runs/fashion_mnist_generators.json
python benchmarks/fashion_mnist_gen_metrics.py $CKPTS \
  --n 2000 --bpd-n 2000 --grids docs/images --out benchmarks/results/fashion_mnist_gen_metrics.json
