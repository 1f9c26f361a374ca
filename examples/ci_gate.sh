#!/usr/bin/env bash
# A CI quality gate: draft and refine samples with a small model, score them with
# `did eval-ppl`, and exit non-zero when the mean gen PPL of the drafts or of the refined samples
# is above MAX_GEN_PPL or their mean unigram entropy is below MIN_ENTROPY.
#
# Usage: MAX_GEN_PPL=X MIN_ENTROPY=Y examples/ci_gate.sh
#   MODEL=run/best MAX_GEN_PPL=80 MIN_ENTROPY=4 examples/ci_gate.sh     # gate an existing checkpoint
#   MAX_GEN_PPL=5000 MIN_ENTROPY=3 STEPS=300 examples/ci_gate.sh        # train a small model first
#
# Environment (default):
#   MAX_GEN_PPL, MIN_ENTROPY   the bars (required)
#   OUT (ci-gate)    work folder: data/, run/, draft.jsonl, refined.jsonl, gate.json
#   MODEL (unset)    checkpoint or run folder to gate; unset = prepare SOURCES and train OUT/run
#                    (skipped when OUT/run/best.json already exists)
#   SOURCES (unset)  text files or folders for `did prepare` (space-separated); unset = bundled corpus
#   PRESET (tiny) SEQ_LEN (64) STEPS (200) BATCH (16) LR (1e-3) WARMUP (20)   training
#   SAMPLES (8)      samples drafted and refined     BLOCK (4)  drafting block size
#   RATIO (0.25)     share of tokens re-masked by the global refine stage
#   SCORER (unset)   eval-ppl --scorer; unset = eval-ppl's default scorer
#   DEVICE (auto)    SEED (0)
#
# Exit status: 0 when both sample files meet the bars; 1 when one misses a bar (the reasons are
# printed and OUT/gate.json says "passed": false) or a step fails; 2 for a usage error.
set -euo pipefail

: "${MAX_GEN_PPL:?set MAX_GEN_PPL (fail when the mean gen PPL is above it)}"
: "${MIN_ENTROPY:?set MIN_ENTROPY (fail when the mean unigram entropy is below it)}"
OUT=${OUT:-ci-gate}
PRESET=${PRESET:-tiny}
SEQ_LEN=${SEQ_LEN:-64}
STEPS=${STEPS:-200}
BATCH=${BATCH:-16}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-20}
SAMPLES=${SAMPLES:-8}
BLOCK=${BLOCK:-4}
RATIO=${RATIO:-0.25}
DEVICE=${DEVICE:-auto}
SEED=${SEED:-0}
mkdir -p "$OUT"

if [[ -z "${MODEL:-}" ]]; then
    if [[ ! -f "$OUT/run/best.json" ]]; then
        # SOURCES is split on spaces on purpose (several files or folders)
        # shellcheck disable=SC2086
        did prepare ${SOURCES:-} --out "$OUT/data" --seq-len "$SEQ_LEN"
        did train --data "$OUT/data" --out "$OUT/run" --preset "$PRESET" --block-sizes "$BLOCK,L" \
            --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup "$WARMUP" \
            --eval-every "$STEPS" --save-every "$STEPS" --eval-batches 2 --seed "$SEED" --quiet
    fi
    MODEL="$OUT/run"  # its latest checkpoint
fi

did draft --model "$MODEL" -n "$SAMPLES" --block-size "$BLOCK" --seed "$SEED" --device "$DEVICE" \
    -o "$OUT/draft.jsonl"
did refine --model "$MODEL" "$OUT/draft.jsonl" --stages "L:$RATIO" --seed "$SEED" --device "$DEVICE" \
    -o "$OUT/refined.jsonl"

scorer=()
if [[ -n "${SCORER:-}" ]]; then scorer=(--scorer "$SCORER"); fi
status=0
did eval-ppl "$OUT/draft.jsonl" "$OUT/refined.jsonl" ${scorer[@]+"${scorer[@]}"} --device "$DEVICE" \
    --json "$OUT/gate.json" --max-gen-ppl "$MAX_GEN_PPL" --min-entropy "$MIN_ENTROPY" || status=$?
if [[ $status -eq 0 ]]; then
    echo "ci_gate: passed (gen PPL <= $MAX_GEN_PPL, entropy >= $MIN_ENTROPY); details in $OUT/gate.json"
else
    echo "ci_gate: FAILED (exit $status); details in $OUT/gate.json" >&2
fi
exit "$status"
