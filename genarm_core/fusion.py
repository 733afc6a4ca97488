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
         normalised: bool = False) -> torch.Tensor:
    """Fused score over the vocabulary.

    base_logprobs: [..., V]; arm_logprobs: [..., N, V]; weights: [..., N] (N may be 0).
    normalised divides by (1 + sum w), which keeps the sharpness constant as weights move.
    """
    score = base_logprobs
    if arm_logprobs.shape[-2] > 0:
        score = score + (weights.unsqueeze(-1).to(arm_logprobs.dtype) * arm_logprobs).sum(-2)
    if normalised:
        score = score / (1.0 + weights.sum(-1, keepdim=True).to(score.dtype))
    return score


def truncate(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf everything outside the top-k tokens and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token is always kept), as in transformers' TopPLogitsWarper.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_logits(score: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """What the sampler draws from: score / T, truncated. T = 0 is handled by `choose`."""
    if temperature > 0:
        score = score / temperature
    return truncate(score, top_k, top_p)


def gumbel_noise(generator: torch.Generator, shape) -> torch.Tensor:
    """Gumbel(0, 1) noise drawn on the generator's device (no host-device copy per token).
    argmax(logits + noise) is a sample of softmax(logits)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def choose(logits: torch.Tensor, temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Greedy when temperature == 0, else the Gumbel-max sample with the given noise."""
    if temperature <= 0 or noise is None:
        return logits.argmax(-1)
    return (logits + noise).argmax(-1)


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
