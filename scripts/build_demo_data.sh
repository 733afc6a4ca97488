#!/usr/bin/env bash
# Builds the demo's preference data into space_assets/data (see scripts/build_preference_data.py
# and space_assets/DATA_CARD.md). About 40 min on a 2-core CPU: first samples (~12 min, one
# process), more samples and forced refusals (~27 min, two one-thread processes), labelling and
# pairing (~3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
export GENARM_THREADS=1 OMP_NUM_THREADS=1
.venv/bin/python scripts/build_preference_data.py --sample-only
rm -f space_assets/data/samples_extra_*.jsonl
pids=()
for shard in 0 1; do
  .venv/bin/python scripts/build_preference_data.py --extra-samples --shard "$shard" --shards 2 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
.venv/bin/python scripts/build_preference_data.py --reuse-samples
