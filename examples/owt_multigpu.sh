#!/usr/bin/env bash
# The full-scale recipe on OpenWebText (L = 1024) on one node with several GPUs: prepare the data,
# mix-scale fine-tune the public BD3-LM checkpoint under `accelerate launch` (DDP or FSDP, chosen
# by the accelerate config file), then draft, refine with snapshot confidence and score.
# Needs CUDA GPUs and the Hugging Face hub (dataset, checkpoint, gpt2-large scorer); see
# docs/finetune-mixscale.md and docs/multi-gpu.md.
#
# Usage: examples/owt_multigpu.sh
#   examples/owt_multigpu.sh                           # 8 GPUs, DDP, the paper's settings
#   STRATEGY=fsdp NUM_GPUS=4 GRAD_ACCUM=8 examples/owt_multigpu.sh
#   MODE=train STEPS=50000 examples/owt_multigpu.sh    # train the `small` model from scratch instead
#
# Environment (default):
#   STRATEGY (ddp)     ddp or fsdp: examples/accelerate/$STRATEGY.yaml
#   NUM_GPUS (8)       processes (one per GPU)
#   MODE (finetune)    finetune: did finetune-mixscale from INIT; train: did train from scratch
#   INIT (kuleshov-group/bd3lm-owt-block_size1024-pretrain)   hub id or local checkpoint folder
#   DATA (owt)  OUT (runs/did-owt)  SEQ_LEN (1024)  VAL_DOCS (100000)  NUM_PROC (32)
#   BATCH (16) GRAD_ACCUM (4)   per-GPU rows and accumulation: 8 x 16 x 4 = 512 rows per step
#   STEPS (unset)      finetune: unset = 26% of 150K steps (39K); train: unset = 100000
#   SAMPLES (256)  BLOCK (4)  RATIO (0.25)  SCORER (gpt2-large)
set -euo pipefail

STRATEGY=${STRATEGY:-ddp}
NUM_GPUS=${NUM_GPUS:-8}
MODE=${MODE:-finetune}
INIT=${INIT:-kuleshov-group/bd3lm-owt-block_size1024-pretrain}
DATA=${DATA:-owt}
OUT=${OUT:-runs/did-owt}
SEQ_LEN=${SEQ_LEN:-1024}
VAL_DOCS=${VAL_DOCS:-100000}
NUM_PROC=${NUM_PROC:-32}
BATCH=${BATCH:-16}
GRAD_ACCUM=${GRAD_ACCUM:-4}
SAMPLES=${SAMPLES:-256}
BLOCK=${BLOCK:-4}
RATIO=${RATIO:-0.25}
SCORER=${SCORER:-gpt2-large}
CONFIG="$(dirname "$0")/accelerate/$STRATEGY.yaml"
[[ -f "$CONFIG" ]] || { echo "no accelerate config $CONFIG (STRATEGY is ddp or fsdp)" >&2; exit 2; }

# 1. data, once, in one process (documents joined with EOS, 1024-token rows, last 100K docs held out)
did prepare Skylion007/openwebtext --out "$DATA" --seq-len "$SEQ_LEN" --val-docs "$VAL_DOCS" --num-proc "$NUM_PROC"

# 2. training on every GPU; a re-run after an interruption continues (--resume)
resume=()
if [[ -d "$OUT/checkpoints" ]]; then resume=(--resume); fi
if [[ "$MODE" == finetune ]]; then
    steps=()
    if [[ -n "${STEPS:-}" ]]; then steps=(--steps "$STEPS"); fi
    accelerate launch --config_file "$CONFIG" --num_processes "$NUM_GPUS" -m did_cli.cli finetune-mixscale \
        --init "$INIT" --data "$DATA" --out "$OUT" \
        --draft-block "$BLOCK" --global-weight 0.1 --budget-fraction 0.26 --baseline-steps 150000 \
        --batch-size "$BATCH" --grad-accum "$GRAD_ACCUM" --clip auto --eval-every 5000 --save-every 5000 \
        ${steps[@]+"${steps[@]}"} ${resume[@]+"${resume[@]}"}
else
    accelerate launch --config_file "$CONFIG" --num_processes "$NUM_GPUS" -m did_cli.cli train \
        --data "$DATA" --out "$OUT" --preset small --block-sizes "$BLOCK,L" --block-weights 0.9,0.1 \
        --steps "${STEPS:-100000}" --batch-size "$BATCH" --grad-accum "$GRAD_ACCUM" \
        --eval-every 5000 --save-every 5000 ${resume[@]+"${resume[@]}"}
fi

# 3. sampling and scoring in one process on one GPU, from the checkpoint with the best validation NELBO
BEST=$(python -c 'import sys; from did_cli.io.checkpoint import resolve_checkpoint; print(resolve_checkpoint(sys.argv[1], "best"))' "$OUT")
did draft --model "$BEST" -n "$SAMPLES" --block-size "$BLOCK" --batch-size 32 --dtype bf16 -o "$OUT/drafts.jsonl"
did refine --model "$BEST" --stages "L:$RATIO" --batch-size 32 --dtype bf16 "$OUT/drafts.jsonl" -o "$OUT/refined.jsonl"
did eval-ppl --scorer "$SCORER" "$OUT/drafts.jsonl" "$OUT/refined.jsonl" --json "$OUT/gen_ppl.json"
