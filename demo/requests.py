"""What a visitor may ask for, checked on the server before anything is tokenised or decoded:
every value from a form or an API call is validated here, with a message that names it."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from genarm_core import Engine, RequestError, SamplingOptions

MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_WAITING = 16  # prompts waiting for the batch before new requests are told to come back


def number(value, name: str, integer: bool = False):
    """A number from a form or an API call; a clear RequestError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RequestError(f"{name}: expected a finite number, got {value}")
    if integer:
        if value != int(value):
            raise RequestError(f"{name}: expected a whole number, got {value}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Sampling:
    """The Sampling accordion's values, in the order of the endpoints' inputs."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    normalised: bool
    repetition_penalty: float
    no_repeat_ngram_size: int
    min_p: float

    FIELDS = 8

    def options(self, eng: Engine | None) -> SamplingOptions:
        """The profile's defaults with these values, checked against the demo's limits."""
        t, top_p = number(self.temperature, "temperature"), number(self.top_p, "top_p")
        max_new, seed = number(self.max_new_tokens, "max_new_tokens", True), number(self.seed, "seed", True)
        if not 0 <= t <= MAX_TEMPERATURE:
            raise RequestError(f"temperature: expected a number in [0, {MAX_TEMPERATURE}], got {t}")
        if not 1 <= max_new <= MAX_NEW_TOKENS:
            raise RequestError(f"max_new_tokens: expected a whole number in [1, {MAX_NEW_TOKENS}], got {max_new}")
        if not isinstance(self.normalised, bool):
            raise RequestError(f"normalised: expected true or false, got {self.normalised!r}")
        base = eng.profile.defaults if eng else SamplingOptions()
        return replace(base, temperature=t, top_p=top_p, max_new_tokens=max_new, seed=seed,
                       normalised=self.normalised,
                       repetition_penalty=number(self.repetition_penalty, "repetition_penalty"),
                       no_repeat_ngram_size=number(self.no_repeat_ngram_size, "no_repeat_ngram_size", True),
                       min_p=number(self.min_p, "min_p"))


@dataclass(frozen=True)
class RunRequest:
    """The inputs of /generate, /steer and /generate_json: profile, prompt, compare (B pane on),
    the sampling values, then the weights of pane A and of pane B (one per slider)."""
    profile: str
    prompt: str
    compare: bool
    sampling: Sampling
    weights_a: tuple
    weights_b: tuple

    @classmethod
    def parse(cls, values: tuple, n_sliders: int) -> "RunRequest":
        profile, prompt, compare, *rest = values
        k = Sampling.FIELDS
        return cls(profile, prompt, bool(compare), Sampling(*rest[:k]), tuple(rest[k:k + n_sliders]),
                   tuple(rest[k + n_sliders:k + 2 * n_sliders]))


def weights_of(eng: Engine, values) -> dict[str, float]:
    return {a.name: number(v, f"weight of '{a.name}'") for a, v in zip(eng.profile.arms, values)}


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise RequestError(f"prompt: expected text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt: {len(prompt)} characters; this demo accepts at most {MAX_PROMPT_CHARS}")
    return prompt


def check_busy(eng: Engine):
    waiting = eng.scheduler.waiting
    if waiting >= MAX_WAITING:
        raise RequestError(f"the demo is busy ({waiting} requests are waiting); please try again in a minute")
