#!/usr/bin/env bash
# Trains the default profile's two ARMs on the project's own preference data (space_assets/data,
# built by scripts/build_preference_data.py) into space_assets/arms/, both at once (one core
# each). About 45 min on a 2-core CPU.
# LoRA on the upper third of SmolLM2's 30 layers only (layers 20-29): cheaper to train (no
# backward through the lower layers) and fewer LoRA modules for the engine's mixed batch.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(--lora-layers 20-29 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
        --batch-size 8 --lr 5e-4 --epochs 1 --eval-every 0 --eval-batch-size 8 --seed 0 --no-progress)
OMP_NUM_THREADS=1 .venv/bin/python -m genarm_core train --objective helpfulness --beta 0.5 \
  --data space_assets/data/helpfulness_train.jsonl --eval-data space_assets/data/helpfulness_heldout.jsonl \
  --max-steps 75 --out space_assets/arms/helpfulness "${COMMON[@]}" &
OMP_NUM_THREADS=1 .venv/bin/python -m genarm_core train --objective harmlessness --beta 0.1 \
  --data space_assets/data/harmlessness_train.jsonl --eval-data space_assets/data/harmlessness_heldout.jsonl \
  --max-steps 64 --out space_assets/arms/harmlessness "${COMMON[@]}" &
wait
