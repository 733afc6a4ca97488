"""The GenARM math, in one place.

Decoding (several ARMs):
    score(v) = log_softmax(base)[v] + sum_i w_i * log_softmax(arm_i)[v]
    p(v)     = softmax(score / T), then top-k / top-p / min-p, then sample (T = 0: argmax)
    sample   = argmax over the kept tokens of score(v) / T + Gumbel noise(v)
Repetition rules on the fused score, before temperature (transformers' semantics, context =
the prompt and the answer so far):
    repetition penalty theta: score(v) * theta if score(v) < 0 else score(v) / theta, for every
                              token v already in the context
    no-repeat n-gram size n:  score(v) = -inf where (last n-1 tokens, v) is an n-gram already
                              in the context
    min-p:                    keep v where p(v) >= min_p * max p (after top-k and top-p)
Training and scoring:
    logp_r(y | x) = sum over response tokens of log pi_r(y_t | x, y_<t)
    loss          = -log sigmoid(beta * (logp_r(y_w) - logp_r(y_l)) - gamma)
                    [+ nll_weight * mean token NLL of y_w, optional]

Every function here is pure tensor code, shared by the engine, the training loss, `score`
and evaluation, and checked by the tests against independent computations.
"""
import math

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (bf16 logits lose too much precision for a sum of models)."""
    return torch.log_softmax(logits.float(), dim=-1)


def fuse(base_logprobs: torch.Tensor, arm_logprobs: torch.Tensor, weights: torch.Tensor,
         normalised=False) -> torch.Tensor:
    """Fused score over the vocabulary.

    base_logprobs: [..., V]; arm_logprobs: [..., N, V]; weights: [..., N] (N may be 0).
    normalised (a bool, or a bool tensor [..., 1] per row) divides by (1 + sum w), which keeps
    the sharpness constant as weights move.
    """
    score = base_logprobs
    if arm_logprobs.shape[-2] > 0:
        score = score + (weights.unsqueeze(-1).to(arm_logprobs.dtype) * arm_logprobs).sum(-2)
    if isinstance(normalised, torch.Tensor):
        scale = 1.0 + weights.sum(-1, keepdim=True).to(score.dtype)
        return torch.where(normalised, score / scale, score)
    if normalised:
        score = score / (1.0 + weights.sum(-1, keepdim=True).to(score.dtype))
    return score


NUCLEUS_SHORTLIST = 1024  # on a CPU, top-k / top-p look at this many best tokens first (exact)


def _rows(value, rows: int) -> list:
    """One value, or one per row, as a list of `rows` values (host side: no device sync)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def _column(values: list, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device)[:, None]


def uniforms(generator: torch.Generator, size: int) -> torch.Tensor:
    """One step's random draw for a vocabulary of `size`: float64 uniforms in (0, 1), drawn on the
    generator's device (no host-device copy per token)."""
    u = torch.rand((size,), generator=generator, dtype=torch.float64, device=generator.device)
    return u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms: argmax(logits + gumbel(u)) is a sample of softmax(logits)."""
    return (-torch.log(-torch.log(u))).float()


def penalise_repeats(score: torch.Tensor, seen: list[list[int]], penalty: list[float]) -> torch.Tensor:
    """The repetition penalty (module docstring): rows' `seen` tokens (the context), penalty per row."""
    rows = [i for i, p in enumerate(penalty) if p != 1.0 and seen[i]]
    if not rows:
        return score
    r = torch.tensor([i for i in rows for _ in seen[i]], device=score.device)
    t = torch.tensor([v for i in rows for v in seen[i]], device=score.device)
    theta = torch.tensor([penalty[i] for i in rows for _ in seen[i]], device=score.device, dtype=score.dtype)
    values = score[r, t]
    score = score.clone()
    score[r, t] = torch.where(values < 0, values * theta, values / theta)
    return score


def ban(score: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """score = -inf at each row's banned tokens (no-repeat n-grams)."""
    if not any(banned):
        return score
    r = torch.tensor([i for i, b in enumerate(banned) for _ in b], device=score.device)
    t = torch.tensor([v for b in banned for v in b], device=score.device)
    score = score.clone()
    score[r, t] = float("-inf")
    return score


class NgramIndex:
    """The tokens that would repeat an n-gram of a growing sequence, kept up to date token by token:
    for every (n-1)-gram seen, the tokens that followed it."""

    def __init__(self, n: int, ids: list[int]):
        self.n, self.ids, self.next = n, [], {}
        for t in ids:
            self.push(t)

    def push(self, token: int):
        self.ids.append(token)
        if self.n >= 1 and len(self.ids) >= self.n:
            prefix = tuple(self.ids[len(self.ids) - self.n:-1])
            self.next.setdefault(prefix, set()).add(token)

    def banned(self) -> list[int]:
        if self.n < 1 or len(self.ids) < self.n - 1:
            return []
        prefix = tuple(self.ids[len(self.ids) - self.n + 1:]) if self.n > 1 else ()
        return sorted(self.next.get(prefix, ()))


def sample(score: torch.Tensor, temperature, top_k=0, top_p=1.0, u: torch.Tensor | None = None,
           min_p=0.0) -> torch.Tensor:
    """One token per row of score [S, V]: the argmax where the row's temperature is 0, else a
    sample of softmax(score / T) restricted to the top-k tokens, then to the top-p nucleus of
    those, then to tokens with at least min_p times the top probability (as transformers' TopK,
    TopP and MinP warpers), by Gumbel-max with the row's uniforms u [S, V]. temperature, top_k
    (0 = off), top_p (1 = off) and min_p (0 = off): one value or one per row."""
    S, V = score.shape
    ts, ks, ps, ms = _rows(temperature, S), _rows(top_k, S), _rows(top_p, S), _rows(min_p, S)
    tokens = score.argmax(-1)
    hot = [i for i in range(S) if ts[i] > 0]
    if u is None or not hot:
        return tokens
    truncated = lambda i: 0 < ks[i] < V or ps[i] < 1 or ms[i] > 0  # noqa: E731
    for cut, group in ((False, [i for i in hot if not truncated(i)]), (True, [i for i in hot if truncated(i)])):
        if not group:
            continue
        rows = torch.tensor(group, device=score.device)
        logits = score[rows] / _column([ts[i] for i in group], score)
        if cut:
            tokens[rows] = _sample_truncated(logits, [ks[i] if 0 < ks[i] < V else 0 for i in group],
                                             [ps[i] for i in group], u[rows], [ms[i] for i in group])
        else:
            tokens[rows] = (logits + gumbel(u[rows])).argmax(-1)
    return tokens


def _sample_truncated(logits: torch.Tensor, ks: list, ps: list, u: torch.Tensor, ms: list) -> torch.Tensor:
    """Gumbel-max over each row's top-k / top-p set only. The set is looked for among the best
    NUCLEUS_SHORTLIST tokens (sorting 49k logits costs milliseconds per row on a CPU), which is
    exact whenever they hold it; rows whose set is wider sort their whole row. Each row's path
    depends on that row alone, so a row samples the same token whatever else is in the batch."""
    V = logits.shape[1]
    K = V if logits.device.type != "cpu" else min(V, max(NUCLEUS_SHORTLIST, *ks))
    values, order = torch.topk(logits, K, dim=-1) if K < V else torch.sort(logits, -1, descending=True)
    keep, covered = _kept(values, order, logits, ks, ps, ms)
    tokens = _gumbel_max(values, order, keep, u)
    wide = [] if K == V else [i for i, ok in enumerate(covered.tolist()) if not ok]  # (a sync on CPU only)
    if wide:
        rows = torch.tensor(wide, device=logits.device)
        values, order = torch.sort(logits[rows], -1, descending=True)
        keep, _ = _kept(values, order, logits[rows], [ks[i] for i in wide], [ps[i] for i in wide],
                        [ms[i] for i in wide])
        tokens[rows] = _gumbel_max(values, order, keep, u[rows])
    return tokens


def _gumbel_max(values, order, keep, u) -> torch.Tensor:
    noisy = (values + gumbel(u.gather(-1, order))).masked_fill(~keep, float("-inf"))
    return order.gather(-1, noisy.argmax(-1, keepdim=True))[:, 0]


def _kept(values: torch.Tensor, order: torch.Tensor, logits: torch.Tensor, ks: list, ps: list, ms: list
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the sorted `values` [S, K] stay: the first k (k = 0: all), then the nucleus of
    those, then those with at least min_p times the top probability; and per row whether the K
    values held the row's whole set [S]."""
    S, K = values.shape
    top_k = _column([bool(k) for k in ks], values, torch.bool)
    keep = torch.arange(K, device=values.device)[None] < _column([k or K for k in ks], values, torch.long)
    # probabilities renormalised over the top-k set (over the whole row when top-k is off); with
    # log_softmax, whose rows do not depend on the batch's size (a plain logsumexp's do)
    within = values.masked_fill(~keep, float("-inf"))
    probs = torch.where(top_k, torch.softmax(within, -1), torch.exp(torch.log_softmax(logits, -1).gather(-1, order)))
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    p = _column(ps, values)
    m = _column([math.log(q) if q > 0 else float("-inf") for q in ms], values)
    above = values - values[:, :1] >= m  # p(v) / max p >= min_p
    covered = ((before[:, -1:] + probs[:, -1:] >= p) | top_k | ((p >= 1) & ~above[:, -1:]) |
               (K == logits.shape[1]))[:, 0]
    return keep & ((before < p) | (p >= 1)) & above, covered


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     length_normalise: bool = False) -> torch.Tensor:
    """Sum of log pi(labels[t] | <t) over positions where mask is 1.

    logits: [B, L, V] from a causal LM on input ids [B, L]; labels, mask: [B, L], aligned
    with the inputs (position t holds token t; its log-prob comes from logits at t - 1).
    """
    logprobs = token_logprobs(logits[:, :-1])
    target = labels[:, 1:]
    m = mask[:, 1:].to(logprobs.dtype)
    picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (picked * m).sum(-1)
    if length_normalise:
        total = total / m.sum(-1).clamp(min=1)
    return total


def arm_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, beta: float,
             gamma: float = 0.0, nll_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(beta * (logp_r(y_w) - logp_r(y_l)) - gamma), per pair, plus
    nll_weight * the chosen answer's mean token NLL when nll_weight > 0.

    The pairwise loss alone only asks the rejected answer to become less likely than the chosen
    one; a small ARM trained long on it can get there by degenerating its own next-token
    distribution (e.g. "I I I ..."), which ruins it for guidance. The NLL term on the chosen
    answers (as in RPO, Pang et al. 2024) keeps it a fluent LM. chosen_tokens: the chosen
    answers' token counts, or None when logp_chosen is already a per-token mean."""
    loss = -F.logsigmoid(beta * (logp_chosen - logp_rejected) - gamma)
    if nll_weight:
        mean_logp = logp_chosen if chosen_tokens is None else logp_chosen / chosen_tokens.clamp(min=1)
        loss = loss - nll_weight * mean_logp
    return loss


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), the training-time alignment GenARM is compared with:
    -log sigmoid(beta * ((logp(y_w) - ref(y_w)) - (logp(y_l) - ref(y_l)))), per pair, where ref
    is the frozen reference policy (here the base, its adapter switched off)."""
    return -F.logsigmoid(beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)))
