"""The next token of every sequence that has its log-probs: the GenARM fusion of the base's and
the ARMs' log-probs under the sequence's pane weights (read now, so they may change between two
tokens), the repetition rules, then each request's sampling options and random draws
(fusion.py holds the math). One host sync per step: the chosen ids and their log-probs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fusion
from .models import LoadedModels
from .runner import Ready


@dataclass
class Pick:
    token: int
    logprob_base: float
    logprob_arms: list[float]
    logprob_fused: float
    eos: bool
    weights: dict[str, float]  # the weights it was drawn with


def choose(m: LoadedModels, ready: list[Ready]) -> list[Pick]:
    seqs = [r.seq for r in ready]
    base = torch.stack([r.base for r in ready])  # [S, V]
    arms = torch.stack([r.arms for r in ready])  # [S, N, V]
    weights = [s.request.panes[s.pane].weights for s in seqs]
    w = torch.tensor([[ws.get(n, 0.0) for n in m.arm_names] for ws in weights], device=m.device, dtype=torch.float32)
    opts = [s.request.options for s in seqs]
    score = fusion.fuse(base, arms, w, normalised=torch.tensor([[o.normalised] for o in opts], device=m.device))
    outs = [s.out for s in seqs]
    ruled = fusion.penalise_repeats(score, [sorted(o.seen) if o.seen else [] for o in outs],
                                    [o.repetition_penalty for o in opts])
    ruled = fusion.ban(ruled, [o.ngrams.banned() if o.ngrams else [] for o in outs])
    tokens = fusion.sample(ruled, [o.temperature for o in opts], [o.top_k for o in opts], [o.top_p for o in opts],
                           _uniforms(seqs, score.shape[-1]), [o.min_p for o in opts])
    pick = tokens[:, None]
    fused_lp = torch.log_softmax(score, -1).gather(-1, pick)  # (its rows do not depend on the batch)
    arm_pick = arms.gather(-1, pick[:, None, :].expand(-1, arms.shape[1], 1)).squeeze(-1)
    eos = torch.isin(tokens, torch.tensor(m.eos_ids or [-1], device=m.device))
    packed = torch.cat([tokens[:, None].float(), base.gather(-1, pick), arm_pick, fused_lp,
                        eos[:, None].float()], -1).tolist()  # the one host sync of the step
    return [Pick(int(row[0]), row[1], row[2:-2], row[-2], bool(row[-1]), ws) for row, ws in zip(packed, weights)]


def _uniforms(seqs, V: int) -> torch.Tensor | None:
    """One random draw per (request, prompt) per step, shared by that prompt's panes."""
    groups: dict[tuple[int, int], int] = {}
    index, draws = [], []
    for s in seqs:
        g = s.request.generators.get(s.prompt)
        if g is None:
            index.append(-1)
            continue
        key = (id(s.request), s.prompt)
        if key not in groups:
            groups[key] = len(draws)
            draws.append(fusion.uniforms(g, V))
        index.append(groups[key])
    if not draws:
        return None
    table = torch.stack(draws + [draws[0].new_full((V,), 0.5)])  # row -1: greedy sequences
    return table[torch.tensor(index, device=table.device)]
