"""The sampling options: one type, validated once at construction (like transformers' logits
processors), used for a request and as a profile's `defaults`. The rules themselves are in
fusion.py. Callers write dataclasses.replace(profile.defaults, **overrides)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import RequestError

SEED_MAX = 2 ** 63 - 1


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keeps tokens with p >= min_p * the top token's p
    repetition_penalty: float = 1.0  # 1 = off; > 1 pushes down tokens already in the context
    no_repeat_ngram_size: int = 0  # 0 = off; n bans a token that would repeat an n-gram
    max_new_tokens: int = 128
    seed: int = 0
    normalised: bool = False  # divide the fused score by (1 + sum of weights)
    stop: tuple[str, ...] = ()  # strings that end the answer (not shown)

    def __post_init__(self):
        checks = [
            (_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0"),
            (_integer(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0"),
            (_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (_number(self.min_p) and 0 <= self.min_p < 1, "min_p", "a number in [0, 1) (0 = off)"),
            (_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "a finite number > 0 (1 = off)"),
            (_integer(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
             "an integer >= 0 (0 = off)"),
            (_integer(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (_integer(self.seed) and 0 <= self.seed <= SEED_MAX, "seed", f"an integer in [0, {SEED_MAX}]"),
            (isinstance(self.normalised, bool), "normalised", "true or false"),
            (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop), "stop",
             "a list of strings"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise RequestError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def validated(self) -> "SamplingOptions":
        """Kept for callers of the old API: options are validated when they are made."""
        return self

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# What each option does, in words: the CLI's --help, the page's and the APIs' descriptions
# (genarm_core/request.py). Every SamplingOptions field has an entry; the request schema checks it.
HELP = {
    "temperature": "0 = greedy; the fused distribution is softmax(score / temperature)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the most likely tokens whose probabilities sum to top_p (1 = off)",
    "min_p": "keep tokens with p >= min_p * the top token's p (0 = off)",
    "repetition_penalty": "> 1 pushes down tokens already in the context (1 = off)",
    "no_repeat_ngram_size": "n bans a token that would repeat an n-gram of the context (0 = off)",
    "max_new_tokens": "the most tokens of the answer",
    "seed": "the random draws' seed: the same seed gives the same answer",
    "normalised": "divide the fused score by 1 + the sum of the weights (constant sharpness)",
    "stop": "strings that end the answer (not shown)",
}
