#!/usr/bin/env bash
# The GPU check: the one command that proves a GPU node, in at most 10 minutes, with one Markdown report.
#
#   bash benchmarks/gpu_check.sh             # on the GPU node, from anywhere: writes gpu_check/report.md
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere, no GPU needed: every stage with its limit and
#                                            # commands (each lgen config composed), and the report skeleton
#
# Stages, each with a time limit in seconds (on a fresh node with nothing cached they sum to at most 600;
# a stage that runs out is stopped, reported, and the next one runs):
#   overhead        SimCLR and MoCo v2 training through lightning_gen vs the same method code in a bare loop
#                   (benchmarks/ssl_throughput.py), fp32 and bf16-mixed, channels_last
#   input_pipeline  images/s of each data path, GPU decoding included, on a JPEG tree generated once,
#                   atomically, and reused only when complete (benchmarks/input_pipeline.py)
#   methods         every method family trains a few steps on digits under trainer.precision=auto, the
#                   generators with the FID callback, every training step inside
#                   torch.cuda.set_sync_debug_mode("error") (benchmarks/gpu_runs.py methods)
#   sampling        time per image of DDPM-1000, DDIM and rectified-flow samplers on the methods stage's
#                   DDPM and flow checkpoints (benchmarks/sampling.py)
#   fsdp            trainer.strategy=fsdp on min(2, GPUs) GPUs: stopped mid-epoch, resumed, exported
#                   (benchmarks/gpu_runs.py fsdp)
#   nccl            2 GPUs or more: 1 process vs 2 DDP vs 2 FSDP NCCL ranks (losses, gradients, weights),
#                   and FID with more ranks than sample chunks (benchmarks/gpu_runs.py nccl)
#
# Python: $PYTHON, else the project's .venv/bin/python, else python3 (never whatever `python` is).
# OUT_DIR (default gpu_check/ in the repository) holds the report, one log per stage and the runs.
# <STAGE>_LIMIT (e.g. METHODS_LIMIT=240) changes a limit. ALLOW_CPU=1 runs every stage tiny on the CPU
# to try the plumbing without a GPU (its numbers mean nothing).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=$(command -v python3) || { echo "gpu_check.sh: no python3 found; set PYTHON" >&2; exit 2; }
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT_DIR=$(mkdir -p "${OUT_DIR:-$REPO/gpu_check}" && cd "${OUT_DIR:-$REPO/gpu_check}" && pwd)
export LGEN_CACHE_DIR=$OUT_DIR/cache  # the FID extractor is built once, in here: nothing cached elsewhere is used
CPU=${ALLOW_CPU:+1}

STAGES=(overhead input_pipeline methods sampling fsdp nccl)
declare -A LIMIT=([overhead]=140 [input_pipeline]=100 [methods]=180 [sampling]=60 [fsdp]=60 [nccl]=60)
declare -A WHAT=(
  [overhead]="lightning_gen vs the same method code in a bare loop, SimCLR and MoCo v2"
  [input_pipeline]="images/s of each data path, nvjpeg decoding included"
  [methods]="every method family: precision=auto, FID on, no host sync in a training step"
  [sampling]="time per image of DDPM, DDIM and rectified-flow samplers"
  [fsdp]="trainer.strategy=fsdp: train, stop mid-epoch, resume, export"
  [nccl]="1 vs 2 NCCL ranks equal (DDP, FSDP); FID with more ranks than chunks"
)
for stage in "${STAGES[@]}"; do
  var=${stage^^}_LIMIT
  LIMIT[$stage]=${!var:-${LIMIT[$stage]}}
done

EXTRACTOR=$LGEN_CACHE_DIR/fid_extractors/digits_16px.pt
CKPTS=$OUT_DIR/runs
declare -A COMMAND
if [ -z "$CPU" ]; then
  COMMAND[overhead]="$PY benchmarks/ssl_throughput.py --steps 20 --warmup 5 --channels-last true"
  COMMAND[input_pipeline]="$PY benchmarks/input_pipeline.py --gpu --root $OUT_DIR/input_pipeline_data --images 5000 --classes 50 --small 1000 --workers 8 --batch 128 --batches 10 --paths pil_crops folder shards"
  COMMAND[methods]="$PY benchmarks/gpu_runs.py methods --out $OUT_DIR"
  COMMAND[sampling]="$PY benchmarks/sampling.py --ddpm $CKPTS/ddpm_digits/gpu/checkpoints/last.ckpt --flow $CKPTS/flow_digits/gpu/checkpoints/last.ckpt --extractor $EXTRACTOR --ddim-steps 10 50 --flow-steps 10 50 --n 500 --batch 500"
  COMMAND[fsdp]="$PY benchmarks/gpu_runs.py fsdp --out $OUT_DIR"
  COMMAND[nccl]="$PY benchmarks/gpu_runs.py nccl --out $OUT_DIR"
else  # the same plumbing, tiny, on the CPU
  COMMAND[overhead]="$PY benchmarks/ssl_throughput.py --device cpu --steps 1 --warmup 1 --batch-size 16 --methods simclr --precisions 32-true --channels-last true"
  COMMAND[input_pipeline]="$PY benchmarks/input_pipeline.py --root $OUT_DIR/input_pipeline_data --images 200 --classes 10 --small 50 --workers 1 --batch 8 --batches 2 --paths folder shards"
  COMMAND[methods]="$PY benchmarks/gpu_runs.py methods --cpu --out $OUT_DIR"
  COMMAND[sampling]="$PY benchmarks/sampling.py --device cpu --ddpm $CKPTS/ddpm_digits/gpu/checkpoints/last.ckpt --flow $CKPTS/flow_digits/gpu/checkpoints/last.ckpt --extractor $EXTRACTOR --ddim-steps 2 --flow-steps 2 --n 20 --batch 20 --skip-ddpm"
  COMMAND[fsdp]="$PY benchmarks/gpu_runs.py fsdp --cpu --out $OUT_DIR"
  COMMAND[nccl]="$PY benchmarks/gpu_runs.py nccl --cpu --out $OUT_DIR"
fi

# ------------------------------------------------------------------------------ the node
if [ $DRY_RUN = 1 ]; then
  GPUS=${GPUS:-1}
  NODE="dry run on $(hostname), as for a node with $GPUS GPU(s)"
else
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())") || { echo "gpu_check.sh: $PY cannot import torch" >&2; exit 2; }
  if [ "$GPUS" = 0 ] && [ -z "$CPU" ]; then
    echo "gpu_check.sh: no CUDA GPU found ($PY; ALLOW_CPU=1 tries the plumbing on the CPU)" >&2
    exit 1
  fi
  NODE=$("$PY" -c "import torch; c = torch.cuda; print(f'{c.get_device_name()} x{c.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}' if c.is_available() else f'CPU only (ALLOW_CPU=1), torch {torch.__version__}')")
fi
if [ -n "$CPU" ]; then GPUS=2; fi  # the CPU plumbing runs the 2-rank stage on 2 CPU processes

runs() {  # whether a stage runs on this node, else why not
  if [ "$1" = nccl ] && [ "$GPUS" -lt 2 ]; then echo "skipped: needs 2 GPUs ($GPUS here)"; fi
}
total=0; total_all=0
for stage in "${STAGES[@]}"; do
  total_all=$((total_all + LIMIT[$stage]))
  [ -z "$(runs "$stage")" ] && total=$((total + LIMIT[$stage]))
done

declare -A RESULT SECONDS_TAKEN
report() {  # the Markdown report: what the node is, and which stage passed
  local stage
  echo "# GPU check: $NODE"
  echo
  echo "Stage limits: $total s on this node ($total_all s with every stage; at most 600 s). Python: $PY. Logs: $OUT_DIR."
  echo
  echo "| stage | what it shows | limit (s) | seconds | result |"
  echo "|---|---|---:|---:|---|"
  for stage in "${STAGES[@]}"; do
    echo "| $stage | ${WHAT[$stage]} | ${LIMIT[$stage]} | ${SECONDS_TAKEN[$stage]:--} | ${RESULT[$stage]:--} |"
  done
  for stage in "${STAGES[@]}"; do
    [ -f "$OUT_DIR/$stage.log" ] || continue
    echo
    echo "## $stage"
    echo
    grep -E '^(\||# )' "$OUT_DIR/$stage.log" || echo "(no table: see $OUT_DIR/$stage.log)"
  done
}

if [ $DRY_RUN = 1 ]; then
  echo "# gpu_check.sh --dry-run: the stages a node with $GPUS GPU(s) runs, with $PY"
  for stage in "${STAGES[@]}"; do
    skip=$(runs "$stage")
    echo "== $stage (limit ${LIMIT[$stage]} s)${skip:+, $skip}"
    echo "   ${COMMAND[$stage]}"
    RESULT[$stage]=${skip:-dry run: would run}
  done
  echo "== total: $total s of stage limits on this node, $total_all s with every stage (at most 600)"
  if [ "$total_all" -gt 600 ]; then
    echo "gpu_check.sh: the stage limits sum to $total_all s, over the 10 minutes the check promises" >&2
    exit 1
  fi
  echo "== the training stages' runs, each lgen config composed:"
  "$PY" benchmarks/gpu_runs.py plan --gpus "$GPUS" --out "$OUT_DIR" ${CPU:+--cpu} || RESULT[methods]="CONFIG ERROR (above)"
  echo
  echo "== report skeleton ($OUT_DIR/report.md on a real run):"
  report | sed '/^## /,$d'
  [ "${RESULT[methods]}" = "dry run: would run" ]
  exit $?
fi

# ------------------------------------------------------------------------------ the run
started=$SECONDS
failed=0
for stage in "${STAGES[@]}"; do
  skip=$(runs "$stage")
  if [ -n "$skip" ]; then RESULT[$stage]=$skip; echo "== $stage: $skip"; continue; fi
  echo "== $stage (limit ${LIMIT[$stage]} s)"
  t0=$SECONDS
  # timeout signals the stage's whole process group (DDP ranks and loader workers included); KILL 10 s later
  timeout --kill-after=10 "${LIMIT[$stage]}" ${COMMAND[$stage]} > "$OUT_DIR/$stage.log" 2>&1
  rc=$?
  SECONDS_TAKEN[$stage]=$((SECONDS - t0))
  case $rc in
    0) RESULT[$stage]=passed ;;
    124|137) RESULT[$stage]="stopped at its ${LIMIT[$stage]} s limit"; failed=1 ;;
    *) RESULT[$stage]="failed (exit $rc): see $stage.log"; failed=1 ;;
  esac
  echo "   ${RESULT[$stage]} in ${SECONDS_TAKEN[$stage]} s"
done
report > "$OUT_DIR/report.md"
echo
cat "$OUT_DIR/report.md"
echo
echo "gpu_check.sh: $((SECONDS - started)) s; report in $OUT_DIR/report.md"
exit $failed
