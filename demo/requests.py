"""What a visitor may ask for, checked on the server before anything is tokenised or decoded. The
checks are the request schema's (genarm_core/request.py) under this server's limits, the same for
the page, the Gradio API and the OpenAI-compatible routes; this module adds the page's own layout
of its inputs."""
from __future__ import annotations

from dataclasses import dataclass

from genarm_core import Engine, RequestError, SamplingOptions
from genarm_core.request import SAMPLING_NAMES, Limits

MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_STOP = 4  # stop strings per request
MAX_CHOICES = 4  # OpenAI's n: independent answers per request
MAX_WAITING = 64  # prompts waiting for the batch before new requests are told to come back (a waiting
# prompt costs no compute; 16 turned away 22 of 32 users arriving at once, whose rows did not fit max_rows)
LIMITS = Limits(max_new_tokens=MAX_NEW_TOKENS, max_temperature=MAX_TEMPERATURE, max_prompt_chars=MAX_PROMPT_CHARS,
                max_stop=MAX_STOP, max_panes=3)


class Busy(RequestError):
    """Too many prompts wait for the batch: come back later (HTTP 429)."""


def check_busy(eng: Engine):
    waiting = eng.scheduler.waiting
    if waiting >= MAX_WAITING:
        raise Busy(f"the demo is busy ({waiting} requests are waiting); please try again in a minute")


# ---- the page's inputs ------------------------------------------------------------------------
def from_page(name: str, value):
    """A Sampling component's value as the schema's: the stop strings are a text, one per line."""
    if name == "stop":
        return [line for line in (value or "").splitlines() if line] if isinstance(value, str) else value
    return value


def to_page(name: str, value):
    return "\n".join(value) if name == "stop" else value


@dataclass(frozen=True)
class RunRequest:
    """The inputs of the page's runs (/generate, /steer, /follow_up): profile, prompt, compare (pane B
    on), one value per sampling option (SamplingOptions' order), then the sliders of pane A and of
    pane B (slider i is the profile's ARM i; sliders past its ARMs are hidden and not read)."""
    profile: str
    prompt: str
    compare: bool
    sampling: dict
    sliders_a: tuple
    sliders_b: tuple

    @classmethod
    def parse(cls, values: tuple, n_sliders: int) -> "RunRequest":
        profile, prompt, compare, *rest = values
        k = len(SAMPLING_NAMES)
        return cls(profile, prompt, bool(compare), sampling_values(rest[:k]), tuple(rest[k:k + n_sliders]),
                   tuple(rest[k + n_sliders:k + 2 * n_sliders]))

    def data(self, eng: Engine) -> dict:
        """The request in the schema's terms: the panes base (no weights), A and B."""
        return {"prompt": self.prompt, **self.sampling,
                "panes": [{}, slider_weights(eng, self.sliders_a), slider_weights(eng, self.sliders_b)]}


def sampling_values(values) -> dict:
    """The Sampling components' values (in SamplingOptions' order) as the schema's options."""
    return {name: from_page(name, v) for name, v in zip(SAMPLING_NAMES, values)}


def slider_weights(eng: Engine, values) -> dict:
    return dict(zip(eng.arm_names, values))


def run_inputs(profile: str, prompt: str, options: SamplingOptions, weights_a: dict, weights_b: dict | None,
               arm_names, n_sliders: int) -> tuple:
    """The page's run inputs for these values, for programs that drive the page itself (tests,
    benchmarks); programs that want answers use the named API or the OpenAI routes instead."""
    def sliders(w):
        return [float((w or {}).get(n, 0.0)) for n in arm_names] + [0.0] * (n_sliders - len(arm_names))
    sampling = [to_page(n, getattr(options, n)) for n in SAMPLING_NAMES]
    return (profile, prompt, weights_b is not None, *sampling, *sliders(weights_a), *sliders(weights_b))
