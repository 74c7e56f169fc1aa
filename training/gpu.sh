#!/usr/bin/env bash
# The demo model's GPU recipe: every stage after the VAE on one CUDA device, time-boxed to fit a ~9-minute
# lease of one H100/H200 (the CPU recipe of training/README.md takes hours for a tenth of the steps).
#
# Inputs in $ROOT: vae/vae_final.pt (`python -m training vae`) and text_contexts.pt (`python -m training
# text`), so the machine needs neither the VAE's training clips nor transformers' umT5.
#
#   ROOT=out/train_gpu bash training/gpu.sh          # then: python -m training export --out out/train_gpu
#
# Environment: DEV (cuda), ROOT, COPY_TO (after each stage its result in bf16 and every log go there, so a
# lease that ends early keeps what finished), SMOKE=1 (tiny sizes, a few steps: checks the whole chain on
# the device in ~1 minute), T_TEACHER / T_ODE / T_CAUSAL (minutes per training stage).
set -u -o pipefail
ROOT=${ROOT:-out/train_gpu}
DEV=${DEV:-cuda}
COPY_TO=${COPY_TO:-}
T_TEACHER=${T_TEACHER:-3.5}
T_ODE=${T_ODE:-0.75}
T_CAUSAL=${T_CAUSAL:-0.75}
if [ "${SMOKE:-0}" = 1 ]; then
  CLIPS=512 PAIRS=64 PAIR_BATCH=32 PAIR_STEPS=8 BATCH=16 STEPS=3 PROCS=2 LAT_BATCH=64
else
  CLIPS=65536 PAIRS=4096 PAIR_BATCH=512 PAIR_STEPS=48 BATCH=256 STEPS=1000000 PROCS=14 LAT_BATCH=256
fi

stage() {
  echo "== $(date +%T) $*"
  python3 -m training "$@" --out "$ROOT" --device "$DEV" --threads 8 --quiet || { echo "== stage $1 failed"; exit 1; }
}

keep() {  # keep <stage dir> <result file>: a bf16 copy of the result + all logs, in $COPY_TO
  [ -n "$COPY_TO" ] || return 0
  mkdir -p "$COPY_TO"
  python3 - "$ROOT/$1/$2" "$COPY_TO/$1.pt" <<'EOF'
import sys
import torch
ck = torch.load(sys.argv[1], weights_only=True)
ck["state"] = {k: v.to(torch.bfloat16) for k, v in ck["state"].items()}
torch.save(ck, sys.argv[2])
EOF
  (cd "$ROOT" && tar czf "$COPY_TO/logs.tar.gz" ./*/log.jsonl ./*/summary.json 2>/dev/null)
}

stage latents --clips $CLIPS --batch $LAT_BATCH --procs $PROCS
stage teacher --steps $STEPS --batch $BATCH --lr 5e-4 --warmup 300 --ema 0.999 --eval-every 1000000 \
  --max-minutes "$T_TEACHER" --ckpt-every 2000 --log-every 100
keep teacher teacher_final.pt
stage ode-pairs --pairs $PAIRS --batch $PAIR_BATCH --steps $PAIR_STEPS
stage ode-init --steps $STEPS --batch $BATCH --lr 1e-4 --ema 0.995 --eval-every 1000000 --max-minutes "$T_ODE" \
  --ckpt-every 2000 --log-every 100
keep ode_init student_final.pt
stage causal-ode --steps $STEPS --batch $BATCH --lr 5e-5 --ema 0.995 --eval-every 1000000 --max-minutes "$T_CAUSAL" \
  --ckpt-every 2000 --log-every 100
keep causal_ode student_final.pt
echo "== $(date +%T) done"
