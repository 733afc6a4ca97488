"""Independent reference computations for the engine: no cache, the whole sequence recomputed
every step, one model at a time, top-k / top-p written out by sorting."""
from __future__ import annotations

import torch


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, -1)


# The engine's float32 error against a float64 reference may be this many times transformers' own
# float32 error on the same inputs (measured alongside it, on the CPU that runs the tests): a bound
# that follows the machine's kernels instead of a constant fitted to one CPU. transformers' own
# error is taken as the largest of its plain forward and PERTURBED forwards whose input embeddings
# carry one float32 rounding of noise: these small random models amplify rounding (up to 5x between
# two equally valid float32 runs), so one run's error alone is luck. A real mistake (a wrong LoRA
# scale, a stale cache row, a masked key read) is off by orders of magnitude more.
ERROR_MULTIPLE = 4.0
PERTURBED = 3


def hf_float32_error(model32, exact: torch.Tensor, ids: list[int]) -> float:
    """transformers' float32 error against `exact` (float64 log-probs after ids): its plain forward
    and PERTURBED forwards with one rounding of noise on the input embeddings (a fixed seed)."""
    g = torch.Generator().manual_seed(len(ids))
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    with torch.no_grad():
        embeds = model32.get_input_embeddings()(torch.tensor([ids]))
        for i in range(1 + PERTURBED):
            e = embeds * (1 + eps * torch.randn(embeds.shape, generator=g)) if i else embeds
            lp = torch.log_softmax(model32(inputs_embeds=e).logits[0, -1].double(), -1)
            worst = max(worst, float((lp - exact).abs().max()))
    return worst


class Float32Budget:
    """Collects the engine's and transformers' float32 errors against float64 on the same inputs;
    check() asserts the engine's stays within ERROR_MULTIPLE times transformers'."""

    def __init__(self):
        self.engine = self.hf = 0.0

    def add(self, got: torch.Tensor, model32, model64, ids: list[int]):
        """got: the engine's log-probs after `ids`; model32/model64: the same model in both dtypes."""
        exact = full_logprobs(model64, ids)
        self.engine = max(self.engine, float((got.double() - exact).abs().max()))
        self.hf = max(self.hf, hf_float32_error(model32, exact, ids))

    def check(self):
        assert self.hf > 0, "no float32 error measured"
        assert self.engine <= ERROR_MULTIPLE * self.hf, (
            f"the engine's float32 error {self.engine:.2e} exceeds {ERROR_MULTIPLE:g} x transformers' own "
            f"{self.hf:.2e} on the same inputs")


def float32_error(pairs, sequences) -> float:
    """transformers' own float32 error against float64 (hf_float32_error): the largest over these
    (model32, model64) pairs and id sequences (every prefix from the prompt's end on)."""
    worst = 0.0
    for model32, model64 in pairs:
        for ids, start in sequences:
            for n in range(start, len(ids) + 1):
                worst = max(worst, hf_float32_error(model32, full_logprobs(model64, ids[:n]), ids[:n]))
    return worst


def keep_top(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Written independently of fusion.sample: walk the sorted list."""
    order = torch.argsort(logits, descending=True).tolist()
    allowed = order[:top_k] if top_k else order
    if top_p < 1.0:
        probs = torch.softmax(logits[allowed], -1).tolist()
        kept, total = [], 0.0
        for tok, p in zip(allowed, probs):
            kept.append(tok)
            total += p
            if total >= top_p:
                break
        allowed = kept
    out = torch.full_like(logits, float("-inf"))
    out[allowed] = logits[allowed]
    return out


def apply_repetition_rules(score: torch.Tensor, context: list[int], penalty: float, ngram: int) -> torch.Tensor:
    """transformers' repetition penalty and no-repeat n-grams, written out token by token."""
    score = score.clone()
    if penalty != 1.0:
        for t in set(context):
            score[t] = score[t] * penalty if score[t] < 0 else score[t] / penalty
    if ngram:
        tail = context[len(context) - ngram + 1:] if ngram > 1 else []
        for i in range(len(context) - ngram + 1):
            if context[i:i + ngram - 1] == tail:
                score[context[i + ngram - 1]] = float("-inf")
    return score


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, -1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def gumbel(generator: torch.Generator, V: int) -> torch.Tensor:
    u = torch.rand((V,), generator=generator, dtype=torch.float64)
    u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return -torch.log(-torch.log(u))


def reference_decode(base, arms: list, weights, prompt: list[int], steps: int, temperature=0.0,
                     top_k=0, top_p=1.0, seed=0, normalised=False, eos_ids=(), weights_at=None,
                     repetition_penalty=1.0, no_repeat_ngram_size=0, min_p=0.0):
    """Returns per step: token, log p_base, [log p_arm], log p_fused (all of the chosen token).
    weights_at(step) overrides weights for that step (mid-stream changes)."""
    ids, out = list(prompt), []
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        w = weights_at(step) if weights_at else weights
        base_lp = full_logprobs(base, ids)
        arm_lps = [full_logprobs(a, ids) for a in arms]
        score = base_lp.clone()
        for wi, lp in zip(w, arm_lps):
            score = score + wi * lp
        if normalised:
            score = score / (1 + sum(w))
        ruled = apply_repetition_rules(score, ids, repetition_penalty, no_repeat_ngram_size)
        if temperature > 0:
            noise = gumbel(gen, score.shape[0])
            logits = keep_top(ruled / temperature, top_k, top_p)
            if min_p > 0:
                logits = keep_min_p(logits, min_p)
            tok = int(torch.argmax(logits + noise))
        else:
            tok = int(torch.argmax(ruled))
        fused = torch.log_softmax(score, -1)
        out.append((tok, float(base_lp[tok]), [float(lp[tok]) for lp in arm_lps], float(fused[tok])))
        ids.append(tok)
        if tok in eos_ids:
            break
    return out
