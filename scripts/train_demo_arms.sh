#!/usr/bin/env bash
# Trains the default profile's two ARMs on the project's own preference data (space_assets/data,
# built by scripts/build_preference_data.py) into space_assets/arms/, both at once (one core
# each). About 45 min on a 2-core CPU.
# - LoRA on the upper third of SmolLM2's 30 layers only (layers 20-29): cheaper to train (no
#   backward through the lower layers) and fewer LoRA modules for the engine's mixed batch.
# - Length-normalised log-probs: in this data the chosen answer is the longer one in 87% of the
#   helpfulness pairs, and a summed log-prob would first have to overcome length.
# - Harmlessness stops after 45 steps (held-out accuracy 58%): two epochs reached 94% held-out
#   accuracy but the ARM's own token distribution collapsed (it answered "I I I ..." at weight 1
#   and declined benign requests at 0.25), while the 45-step ARM declines harmful requests at
#   weight 2 and still answers benign ones. Preference accuracy is not guidance quality.
# - Held-out accuracy on a fixed random 120 of the 200 held-out pairs (CPU time).
set -euo pipefail
cd "$(dirname "$0")/.."
for obj in helpfulness harmlessness; do
  .venv/bin/python - "$obj" <<'PY'
import random, sys
obj = sys.argv[1]
rows = open(f"space_assets/data/{obj}_heldout.jsonl").read().splitlines()
random.Random(0).shuffle(rows)
open(f"space_assets/data/{obj}_heldout_sample.jsonl", "w").write("\n".join(rows[:120]) + "\n")
PY
done
COMMON=(--lora-layers 20-29 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
        --length-normalise --batch-size 8 --lr 5e-4 --eval-batch-size 8 --seed 0 --no-progress)
OMP_NUM_THREADS=1 .venv/bin/python -m genarm_core train --objective helpfulness --beta 0.5 \
  --data space_assets/data/helpfulness_train.jsonl --eval-data space_assets/data/helpfulness_heldout_sample.jsonl \
  --max-steps 50 --eval-every 0 --out space_assets/arms/helpfulness "${COMMON[@]}" > space_assets/arms/helpfulness.log 2>&1 &
OMP_NUM_THREADS=1 .venv/bin/python -m genarm_core train --objective harmlessness --beta 0.5 \
  --data space_assets/data/harmlessness_train.jsonl --eval-data space_assets/data/harmlessness_heldout_sample.jsonl \
  --max-steps 45 --eval-every 0 --out space_assets/arms/harmlessness "${COMMON[@]}" > space_assets/arms/harmlessness.log 2>&1 &
wait
