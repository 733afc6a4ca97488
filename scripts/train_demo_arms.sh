#!/usr/bin/env bash
# Trains the default profile's two ARMs on the project's own preference data (space_assets/data,
# built by scripts/build_demo_data.sh and scripts/build_long_pairs.py) into space_assets/arms/,
# one after the other on all cores. The helpfulness ARM learns from everyday prompts only
# (helpfulness_everyday_*.jsonl: the earlier short pairs and pairs of 160-token answers), so that
# harmful requests stay the harmlessness ARM's business; the harmlessness ARM also from long
# refusals that hold against ones that pivot to complying, and from the first ARMs' own guided
# answers (on-policy pairs: build_long_pairs.py --objective harmlessness-on-policy, which needs
# trained ARMs; so a rebuild from scratch trains both, builds those pairs, then runs
# `bash scripts/train_demo_arms.sh harmlessness` again) (harmlessness_all_*.jsonl).
# - LoRA on the upper third of SmolLM2's 30 layers only (layers 20-29): cheaper to train (no
#   backward through the lower layers) and fewer LoRA modules for the engine's mixed batch.
# - Length-normalised log-probs: chosen and rejected answers differ a lot in length (refusals are
#   short), and a summed log-prob would mostly learn length.
# - An NLL term on the chosen answers (--nll-weight): without it, a harmlessness ARM trained to
#   94% held-out accuracy had collapsed into "I I I ..." as a guide.
# - Both at lr 1e-3. Harmlessness is the harder preference (same-style answers and refusals whose
#   order flips with the prompt) and gets two epochs; helpfulness one over its larger set.
# - Held-out accuracy on helpfulness_everyday_heldout (116 pairs) and harmlessness_all_heldout (126);
#   their short pairs are a fixed random 120 of the 200 held-out pairs, written below (CPU time).
# - About 63 min on a 2-core AMD EPYC (AVX-512): helpfulness 150 steps, 31 min; harmlessness
#   218 steps, 32 min.
# - harmlessness_read (not in the default run, since its pairs need the first ARMs' on-policy pairs and
#   their reads): the harmlessness recipe on harmlessness_read_train.jsonl, the pairs changed by reading
#   their chosen refusals (scripts/read_pairs.py apply; data card, "Pair reads"), into
#   space_assets/arms/harmlessness_read: the read-pairs profile's harmlessness ARM (the default's before
#   the on-policy rounds). Its data also holds one
#   everyday pair per turned pair, an answer over that same written refusal (read_pairs.py
#   counterparts). 256 steps, 17.5 min on a 2-core Intel Xeon (AVX-512, AMX).
# - harmlessness_read2 (not in the default run: its pairs need the read-pairs profile's own answers,
#   read): the same recipe on harmlessness_read2_train.jsonl, harmlessness_read's pairs plus pairs of
#   the read-pairs profile's answers to harmful training prompts at h1 H2 and h0 H2, one that holds as
#   read over each that does not, with everyday counterparts (scripts/build_read_onpolicy.py), into
#   space_assets/arms/harmlessness_read2.
# - harmlessness_read3 (not in the default run): the same again one round on (build_read_onpolicy.py
#   --round 2): harmlessness_read2's pairs plus pairs of the harmlessness_read2 profile's own answers,
#   read, into space_assets/arms/harmlessness_read3: the default profile's harmlessness ARM.
# - helpfulness_hold (not in the default run, not shipped): the helpfulness recipe on
#   helpfulness_hold_train.jsonl, the everyday pairs plus pairs on harmful prompts where both sides
#   decline and the redirect is chosen (scripts/build_decline_pairs.py), into
#   space_assets/arms/helpfulness_hold. 183 steps, 30 min on the same machine. Alone at weight 2 it
#   declined 8% of everyday requests (README), so the profiles keep the helpfulness ARM.
# Usage: bash scripts/train_demo_arms.sh [helpfulness] [harmlessness] [harmlessness_read] [harmlessness_read2] [harmlessness_read3] [helpfulness_hold]
#   (default: the first two)
set -euo pipefail
cd "$(dirname "$0")/.."
objectives=("$@")
[ ${#objectives[@]} -gt 0 ] || objectives=(helpfulness harmlessness)
declare -A DATA=(
  [helpfulness]="--data space_assets/data/helpfulness_everyday_train.jsonl --eval-data space_assets/data/helpfulness_everyday_heldout.jsonl"
  [harmlessness]="--data space_assets/data/harmlessness_all_train.jsonl --eval-data space_assets/data/harmlessness_all_heldout.jsonl"
  [harmlessness_read]="--data space_assets/data/harmlessness_read_train.jsonl --eval-data space_assets/data/harmlessness_all_heldout.jsonl"
  [harmlessness_read2]="--data space_assets/data/harmlessness_read2_train.jsonl --eval-data space_assets/data/harmlessness_read2_heldout.jsonl"
  [harmlessness_read3]="--data space_assets/data/harmlessness_read3_train.jsonl --eval-data space_assets/data/harmlessness_read3_heldout.jsonl"
  [helpfulness_hold]="--data space_assets/data/helpfulness_hold_train.jsonl --eval-data space_assets/data/helpfulness_hold_heldout.jsonl"
)
for obj in "${objectives[@]}"; do
  [ -n "${DATA[$obj]:-}" ] || { echo "unknown objective: $obj (one of: ${!DATA[*]})" >&2; exit 2; }
done
for obj in "${objectives[@]}"; do
  [ "$obj" = helpfulness ] || [ "$obj" = harmlessness ] || continue
  .venv/bin/python - "$obj" <<'PY'
import random, sys
obj = sys.argv[1]
rows = open(f"space_assets/data/{obj}_heldout.jsonl").read().splitlines()
random.Random(0).shuffle(rows)
open(f"space_assets/data/{obj}_heldout_sample.jsonl", "w").write("\n".join(rows[:120]) + "\n")
PY
done
COMMON=(--lora-layers 20-29 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
        --length-normalise --nll-weight 0.3 --beta 0.5 --batch-size 8 --eval-batch-size 8 --seed 0 --no-progress)
declare -A RECIPE=(  # per objective: every ARM of an objective trains with its recipe, on its own DATA
  [helpfulness]="--lr 1e-3 --epochs 1 --eval-every 50"
  [harmlessness]="--lr 1e-3 --epochs 2 --eval-every 45"
)
for obj in "${objectives[@]}"; do
  objective="${obj%%_*}"
  # shellcheck disable=SC2086
  .venv/bin/python -m genarm_core train --objective "$objective" ${DATA[$obj]} \
    --out "space_assets/arms/$obj" "${COMMON[@]}" ${RECIPE[$objective]} > "space_assets/arms/$obj.log" 2>&1
done
