#!/usr/bin/env bash
# The training-time baseline GenARM is compared with: a DPO policy, a LoRA adapter on the base
# trained with the project's own training code (`train --loss dpo`, reference = the base with the
# adapter off) on the same preference pairs as both ARMs (helpfulness + harmlessness), with the
# same LoRA shape (r=8 on layers 20-29, all seven projections). Then merged into a full model
# folder so that it decodes alone:
#     .venv/bin/python scripts/evaluate_tradeoff.py ... --dpo runs/dpo-merged
# Not shipped (regenerable); a full epoch (258 steps, 2064 pairs) took 49 min on a 2-core AMD EPYC
# (held-out implicit-reward accuracy 80.1%, 256 pairs); extra
# arguments go to `train`, e.g. --max-steps 60.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m genarm_core train --loss dpo --objective hh-dpo \
  --data space_assets/data/helpfulness_everyday_train.jsonl --data space_assets/data/harmlessness_all_train.jsonl \
  --eval-data space_assets/data/helpfulness_everyday_heldout.jsonl --eval-data space_assets/data/harmlessness_all_heldout.jsonl \
  --lora-layers 20-29 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --beta 0.1 --lr 5e-4 --epochs 1 --batch-size 8 --eval-batch-size 8 --eval-every 80 --seed 0 --no-progress \
  --out runs/dpo "$@"
.venv/bin/python - <<'PY'
import copy
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from genarm_core.models import builtin_folder

base_dir = builtin_folder("smollm2-135m-instruct")
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
merged = PeftModel.from_pretrained(base, "runs/dpo").merge_and_unload()
out = Path("runs/dpo-merged")
merged.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
print(f"wrote {out}")
PY
