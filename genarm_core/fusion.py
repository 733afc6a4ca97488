"""The GenARM math, in one place.

Decoding (several ARMs):
    score(v) = log_softmax(base)[v] + sum_i w_i * log_softmax(arm_i)[v]
    p(v)     = softmax(score / T), then top-k / top-p, then sample (T = 0: argmax)
Training and scoring:
    logp_r(y | x) = sum over response tokens of log pi_r(y_t | x, y_<t)
    loss          = -log sigmoid(beta * (logp_r(y_w) - logp_r(y_l)) - gamma)
                    [+ nll_weight * mean token NLL of y_w, optional]

Every function here is pure tensor code, shared by the engine, the training loss, `score`
and evaluation, and checked by the tests against independent computations.
"""
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


NUCLEUS_SHORTLIST = 1024  # top-p looks at this many best tokens first (exact: see truncate)


def _rows(value, rows: int) -> list:
    """One value, or one per row, as a list of `rows` values (host side: no device sync)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def _column(values: list, like: torch.Tensor, dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)[:, None]


def top_k_mask(logits: torch.Tensor, top_k) -> torch.Tensor:
    """True outside each row's k most likely tokens (top_k: one int or one per row; 0 = off)."""
    S, V = logits.shape
    ks = [k if 0 < k < V else 0 for k in _rows(top_k, S)]
    if not any(ks):
        return torch.zeros_like(logits, dtype=torch.bool)
    values = torch.topk(logits, max(ks), dim=-1).values  # [S, kmax], sorted
    k = _column(ks, logits, torch.long)
    kth = values.gather(-1, (k - 1).clamp(min=0))
    return (k > 0) & (logits < kth)


def top_p_mask(logits: torch.Tensor, top_p) -> torch.Tensor:
    """True outside each row's nucleus: the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token always stays), as in transformers' TopPLogitsWarper.

    Exact and fast on CPU, where sorting 49k logits costs milliseconds per row: the nucleus is
    looked for among the NUCLEUS_SHORTLIST best tokens first (probabilities normalised over the
    whole row); only rows whose shortlist holds less than top_p of the mass sort everything."""
    S, V = logits.shape
    ps = _rows(top_p, S)
    on = [p < 1.0 for p in ps]
    drop = torch.zeros_like(logits, dtype=torch.bool)
    if not any(on):
        return drop
    rows = torch.tensor([i for i, o in enumerate(on) if o], device=logits.device)
    sub, p = logits[rows], _column([q for q, o in zip(ps, on) if o], logits, logits.dtype)
    K = min(V, NUCLEUS_SHORTLIST) if logits.device.type == "cpu" else V
    values, order = torch.topk(sub, K, dim=-1) if K < V else torch.sort(sub, -1, descending=True)
    probs = torch.exp(values - torch.logsumexp(sub, -1, keepdim=True))
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    if K < V and not bool((before[:, -1:] + probs[:, -1:] >= p).all()):
        values, order = torch.sort(sub, -1, descending=True)  # some nucleus is wider: sort all
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs
    keep = torch.zeros_like(sub, dtype=torch.bool).scatter_(-1, order, before < p)
    drop[rows] = ~keep
    return drop


def truncate(logits: torch.Tensor, top_k=0, top_p=1.0) -> torch.Tensor:
    """Mask to -inf everything outside the top-k tokens, then outside the top-p nucleus of what
    remains. logits [S, V]; top_k, top_p: one value or one per row."""
    logits = logits.masked_fill(top_k_mask(logits, top_k), float("-inf"))
    return logits.masked_fill(top_p_mask(logits, top_p), float("-inf"))


def sampling_logits(score: torch.Tensor, temperature, top_k=0, top_p=1.0) -> torch.Tensor:
    """What the sampler draws from: score / T, truncated. Rows with T = 0 keep the score (they
    take its argmax in `choose`)."""
    ts = _rows(temperature, score.shape[0])
    if any(t > 0 for t in ts):
        score = score / _column([t if t > 0 else 1.0 for t in ts], score, score.dtype)
    return truncate(score, top_k, top_p)


def gumbel_noise(generator: torch.Generator, shape) -> torch.Tensor:
    """Gumbel(0, 1) noise drawn on the generator's device (no host-device copy per token).
    argmax(logits + noise) is a sample of softmax(logits)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def choose(logits: torch.Tensor, temperature, noise: torch.Tensor | None) -> torch.Tensor:
    """Per row: the argmax when its temperature is 0, else the Gumbel-max sample with its noise."""
    ts = _rows(temperature, logits.shape[0])
    if noise is None or not any(t > 0 for t in ts):
        return logits.argmax(-1)
    sampled = (logits + noise).argmax(-1)
    if all(t > 0 for t in ts):
        return sampled
    return torch.where(_column(ts, logits, logits.dtype)[:, 0] > 0, sampled, logits.argmax(-1))


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
