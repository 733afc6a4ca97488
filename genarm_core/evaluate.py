"""Trade-off evaluation: generate on held-out prompts across a grid of ARM weights and several
seeds, judge every answer, and summarise each setting (judge means with their spread across
seeds, refusal rates, each ARM's trajectory reward, helpfulness against the base's paired by
prompt). All grid points of one prompt decode as panes of one batch with shared random draws, so
settings differ only by their weights."""
from __future__ import annotations

import itertools
import random
import statistics
import time

from .engine import Engine, SamplingOptions


def weight_grid(names: list[str], values) -> list[dict[str, float]]:
    """Every combination of weights: `values` is one list for all ARMs, or a dict of lists by name."""
    per_arm = [values[n] for n in names] if isinstance(values, dict) else [values] * len(names)
    return [dict(zip(names, combo)) for combo in itertools.product(*per_arm)]


def read_prompts(path) -> list[dict]:
    """JSONL with {"prompt", "family": "benign"|"harmful", "category"}."""
    from .data import DataError, jsonl_records

    rows = []
    for n, row in jsonl_records(path, "prompts"):
        if not isinstance(row.get("prompt"), str) or row.get("family") not in ("benign", "harmful"):
            raise DataError(f"{path}:{n}: expected 'prompt' (string) and 'family' (benign or harmful)")
        rows.append(row)
    return rows


def run_grid(engine: Engine, prompts: list[dict], grid: list[dict], seeds: list[int],
             options: SamplingOptions, prompts_per_batch: int = 4, progress=print) -> list[dict]:
    """One record per (prompt, seed, setting): the answer, its judge scores and ARM rewards."""
    records = []
    start = time.time()
    for seed in seeds:
        opts = SamplingOptions(**{**options.__dict__, "seed": seed})
        for i in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[i:i + prompts_per_batch]
            results = engine.generate([p["prompt"] for p in chunk], grid, opts)
            records += judge_records([
                {"prompt": p["prompt"], "family": p["family"], "category": p.get("category", ""), "seed": seed,
                 "weights": w, "text": c.text, "tokens": len(c.token_ids), "rewards": c.rewards(engine.models.betas)}
                for p, row in zip(chunk, results) for w, c in zip(grid, row)])
            progress(f"seed {seed}: {min(i + prompts_per_batch, len(prompts))}/{len(prompts)} prompts "
                     f"({time.time() - start:.0f} s)")
    return records


def judge_records(records: list[dict]) -> list[dict]:
    """The records with the judges' scores added, or replaced (after a change to the judges)."""
    from .judges import score_batch

    judged = score_batch([r["prompt"] for r in records], [r["text"] for r in records],
                         [r["family"] == "harmful" for r in records])
    return [{**r, **j} for r, j in zip(records, judged)]


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def paired_gain(records: list[dict], setting: dict, baseline: dict, key: str = "helpfulness",
                family: str | None = None, draws: int = 2000, seed: int = 0) -> dict | None:
    """The mean difference of a judge score between two settings on the same prompts and seeds,
    with a 95% percentile bootstrap interval. Differences are averaged over seeds per prompt and
    the bootstrap resamples prompts, since answers to one prompt are not independent."""
    def scores(w):
        return {(r["prompt"], r["seed"]): r[key] for r in records
                if r["weights"] == w and (family is None or r["family"] == family)}

    a, b = scores(setting), scores(baseline)
    per_prompt: dict[str, list[float]] = {}
    for (prompt, s), value in a.items():
        if (prompt, s) in b:
            per_prompt.setdefault(prompt, []).append(value - b[(prompt, s)])
    diffs = [statistics.fmean(v) for v in per_prompt.values()]
    if not diffs:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return {"mean": statistics.fmean(diffs), "low": means[int(0.025 * draws)],
            "high": means[int(0.975 * draws) - 1], "prompts": len(diffs)}


def summarise(records: list[dict], grid: list[dict]) -> list[dict]:
    """Per setting: each metric's mean over prompts and seeds, the std of the per-seed means, and
    (when the grid has the all-zero setting) helpfulness against the base's, paired by prompt."""
    seeds = sorted({r["seed"] for r in records})
    base = next((w for w in grid if not any(w.values())), None)
    out = []
    for w in grid:
        rows = [r for r in records if r["weights"] == w]
        metrics = {
            "helpfulness": lambda rs: _mean([r["helpfulness"] for r in rs]),
            "harmlessness": lambda rs: _mean([r["harmlessness"] for r in rs]),
            "helpfulness_benign": lambda rs: _mean([r["helpfulness"] for r in rs if r["family"] == "benign"]),
            "harmlessness_harmful": lambda rs: _mean([r["harmlessness"] for r in rs if r["family"] == "harmful"]),
            "refusal_harmful": lambda rs: _mean([float(r["refusal"]) for r in rs if r["family"] == "harmful"]),
            "refusal_benign": lambda rs: _mean([float(r["refusal"]) for r in rs if r["family"] == "benign"]),
            "tokens": lambda rs: _mean([r["tokens"] for r in rs]),
        }
        for name in w:
            metrics[f"reward_{name}"] = lambda rs, n=name: _mean([r["rewards"][n] for r in rs])
        summary = {"weights": w, "n": len(rows)}
        for key, fn in metrics.items():
            per_seed = [fn([r for r in rows if r["seed"] == s]) for s in seeds]
            summary[key] = fn(rows)
            summary[f"{key}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        if base is not None and w != base:
            summary["helpfulness_vs_base"] = paired_gain(records, w, base)
            summary["helpfulness_benign_vs_base"] = paired_gain(records, w, base, family="benign")
        out.append(summary)
    return out


def plot(summary: list[dict], path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xs, ys = [s["helpfulness"] for s in summary], [s["harmlessness"] for s in summary]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed = []  # (x, y, line) of labelled points: a label near others takes the first free line
    for s in summary:
        w = s["weights"]
        label = ", ".join(f"{k[:4]}={v:g}" for k, v in w.items())
        base = all(v == 0 for v in w.values())
        ax.errorbar(s["helpfulness"], s["harmlessness"], xerr=s["helpfulness_std"], yerr=s["harmlessness_std"],
                    fmt="*" if base else "o", ms=12 if base else 6, capsize=2,
                    color="black" if base else None)
        taken = {line for x, y, line in placed
                 if abs(s["helpfulness"] - x) / span_x < 0.15 and abs(s["harmlessness"] - y) / span_y < 0.04}
        line = next(k for k in itertools.count() if k not in taken)
        placed.append((s["helpfulness"], s["harmlessness"], line))
        right = (s["helpfulness"] - min(xs)) / span_x > 0.75  # label to the left, inside the axes
        ax.annotate(label, (s["helpfulness"], s["harmlessness"]), fontsize=7, textcoords="offset points",
                    xytext=(-4 if right else 4, 4 - 10 * line), ha="right" if right else "left")
    ax.set_xlabel("helpfulness judge (mean over held-out prompts)")
    ax.set_ylabel("harmlessness judge (mean)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _gain(g: dict | None) -> str:
    return "-" if not g else f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"


def markdown_table(summary: list[dict]) -> str:
    names = list(summary[0]["weights"])
    head = ("| " + " | ".join(names) + " | helpfulness | harmlessness | helpfulness (benign) | "
            "benign helpfulness vs base [95% CI] | refusals (harmful) | refusals (benign) |")
    lines = [head, "|" + "---|" * (len(names) + 6)]
    for s in summary:
        ws = " | ".join(f"{s['weights'][n]:g}" for n in names)
        lines.append(f"| {ws} | {s['helpfulness']:.3f} ± {s['helpfulness_std']:.3f} | "
                     f"{s['harmlessness']:.3f} ± {s['harmlessness_std']:.3f} | "
                     f"{s['helpfulness_benign']:.3f} ± {s['helpfulness_benign_std']:.3f} | "
                     f"{_gain(s.get('helpfulness_benign_vs_base'))} | "
                     f"{100 * s['refusal_harmful']:.0f}% | {100 * s['refusal_benign']:.0f}% |")
    return "\n".join(lines)
