"""Helpfulness pairs on harmful prompts that are neutral about declining: both sides decline.

    .venv/bin/python scripts/build_decline_pairs.py   # -> helpfulness_hold_{train,heldout}.jsonl

The helpfulness ARM learns from everyday prompts only (helpfulness_everyday_*.jsonl), and with it
on, guided answers to harmful requests still turn to complying after a first declining sentence
(README, "Both on"): what it learned about substance carries over to harmful prompts, where it has
never seen a declining answer preferred. Here each harmful prompt gets pairs in which both sides
decline, and the more helpful decline is chosen: a written redirect (declines, says why, offers a
safe alternative; data/written_responses.json, the prompt's category first) over a bare written
refusal. Neither side complies, so the pairs say nothing for or against declining; what the ARM
learns is what a helpful answer to such a request looks like. Writes helpfulness_hold_{split}.jsonl:
the everyday pairs of helpfulness_everyday_{split}.jsonl plus these (train: the 132 harmful
training prompts, PER_PROMPT each; heldout: the 48 held-out ones, one each). Deterministic.
"""
import json
import random
from pathlib import Path

from genarm_core.data import jsonl_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "space_assets/data"
WRITTEN = ROOT / "data/written_responses.json"
PER_PROMPT = {"train": 2, "heldout": 1}


def decline_pairs(prompts: list[dict], written: dict, per_prompt: int, seed: int = 0) -> list[dict]:
    """per_prompt pairs (redirect over bare refusal) for each harmful prompt; the k-th pair of a
    prompt takes its category's k-th redirect while there is one, then the generic ones."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        if p["family"] != "harmful":
            continue
        redirects = written["redirects"].get(p["category"], []) + rng.sample(written["generic_redirects"], per_prompt)
        for chosen, rejected in zip(redirects[:per_prompt], rng.sample(written["refusals"], per_prompt)):
            out.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "family": "harmful",
                        "category": p["category"], "pair_type": "redirect_vs_refusal",
                        "chosen_source": "written_redirect", "rejected_source": "written_refusal",
                        "score_chosen": None, "score_rejected": None,
                        "chosen_complete": True, "rejected_complete": True})
    return out


def main():
    written = json.loads(WRITTEN.read_text())
    for split, n in PER_PROMPT.items():
        everyday = jsonl_rows(DATA / f"helpfulness_everyday_{split}.jsonl")
        extra = decline_pairs(jsonl_rows(DATA / f"prompts_{split}.jsonl"), written, n)
        path = DATA / f"helpfulness_hold_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in everyday + extra))
        print(f"{path.name}: {len(everyday)} everyday pairs + {len(extra)} redirect-over-refusal pairs")


if __name__ == "__main__":
    main()
