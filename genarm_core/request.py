"""One request schema for every surface that asks the engine for text: the CLI's flags, a profile's
`defaults`, the page's controls, the Gradio API and the OpenAI-compatible routes.

Its fields are SamplingOptions' own, read with dataclasses.fields (so a new option reaches every
surface from here), and four more: `prompt` (a text, or a list of chat messages), `profile`,
`weights` ({ARM name: weight}; ARMs not named are off) and `panes` (several weight settings decoded
together, sharing their random draws; instead of `weights`). `parse` checks a request once; every
message begins with the name of the field at fault, as the caller calls it (`names`).
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from .errors import RequestError
from .options import HELP, SamplingOptions

ROLES = ("system", "user", "assistant")
_ANNOTATIONS = {float: float, int: int, bool: bool, tuple[str, ...]: list[str]}


@dataclass(frozen=True)
class Field:
    name: str
    annotation: object  # the type a typed API declares: float, int, bool, list[str], ...
    help: str  # left out, a field takes the profile's default (the prompt is required)


def _sampling_fields() -> tuple[Field, ...]:
    hints = typing.get_type_hints(SamplingOptions)
    out = []
    for f in fields(SamplingOptions):
        if hints[f.name] not in _ANNOTATIONS or f.name not in HELP:
            raise TypeError(f"SamplingOptions.{f.name}: give it a type the request schema knows "
                            f"({', '.join(map(str, _ANNOTATIONS))}) and a line in options.HELP")
        out.append(Field(f.name, _ANNOTATIONS[hints[f.name]], HELP[f.name]))
    return tuple(out)


SAMPLING_FIELDS = _sampling_fields()
SAMPLING_NAMES = tuple(f.name for f in SAMPLING_FIELDS)
FIELDS = (
    Field("prompt", str | list[dict[str, str]],
          "the request: a text, or chat messages [{\"role\": \"user\", \"content\": \"...\"}, ...]"),
    Field("profile", str, "the models.yaml profile (default: the server's default)"),
    Field("weights", dict[str, float], "each ARM's weight, by name, e.g. {\"harmlessness\": 2}; "
          "ARMs not named are off (0)"),
    Field("panes", list[dict[str, float]], "several weight settings, decoded together with the same "
          "random draws (instead of weights), e.g. [{}, {\"harmlessness\": 2}]: the base and one steered"),
    *SAMPLING_FIELDS,
)
NAMES = tuple(f.name for f in FIELDS)


@dataclass(frozen=True)
class Limits:
    """A server's rules on top of the options' own (the demo's are in demo/requests.py)."""
    max_new_tokens: int | None = None
    max_temperature: float | None = None
    max_prompt_chars: int | None = None
    max_stop: int | None = None  # stop strings per request
    max_panes: int | None = None


NO_LIMITS = Limits()


@dataclass(frozen=True)
class Request:
    prompt: str | list[dict]
    options: SamplingOptions
    panes: tuple[dict[str, float], ...]  # one per pane, every ARM of the profile named


def parse(data: Mapping, engine, limits: Limits = NO_LIMITS, names: Mapping[str, str] | None = None) -> Request:
    """A request (field name -> value; absent or None: the profile's default) checked against the
    engine's profile and a server's limits. `names`: what the caller calls a field, for messages."""
    names = names or {}
    if not isinstance(data, Mapping):
        raise RequestError(f"request: expected an object of fields, got {type(data).__name__}")
    unknown = [k for k in data if k not in NAMES]
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(str, unknown))}; known: "
                           f"{', '.join(names.get(n, n) for n in NAMES)}")
    profile = data.get("profile")
    if profile is not None and profile != engine.profile.name:
        raise RequestError(f"{names.get('profile', 'profile')}: this engine serves '{engine.profile.name}', "
                           f"not {profile!r}")
    opts = options({k: data.get(k) for k in SAMPLING_NAMES}, engine.profile.defaults, limits, names)
    return Request(check_prompt(data.get("prompt"), limits, names.get("prompt", "prompt")), opts,
                   panes(data.get("weights"), data.get("panes"), engine, opts.normalised, limits, names))


def options(values: Mapping, defaults: SamplingOptions, limits: Limits = NO_LIMITS,
            names: Mapping[str, str] | None = None) -> SamplingOptions:
    """`defaults` with the given values (None: keep the default), checked by SamplingOptions and the
    limits. Whole numbers may come as floats (sliders, JSON); a single stop string as a string."""
    names = names or {}
    kinds = {f.name: f.annotation for f in SAMPLING_FIELDS}
    unknown = [k for k in values if k not in kinds]
    if unknown:
        raise RequestError(f"unknown option(s) {', '.join(map(str, unknown))}; known: {', '.join(kinds)}")
    given = {}
    for name, value in values.items():
        if value is None:
            continue
        if kinds[name] is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kinds[name] == list[str] and isinstance(value, str):
            value = [value]
        given[name] = value
    try:
        opts = replace(defaults, **given)
    except RequestError as e:  # its message begins with the field's name
        name, _, rest = str(e).partition(": ")
        raise RequestError(f"{names.get(name, name)}: {rest}") from None
    _check_limits(opts, limits, names)
    return opts


def _check_limits(o: SamplingOptions, limits: Limits, names: Mapping[str, str]):
    checks = [
        (limits.max_new_tokens, o.max_new_tokens, "max_new_tokens", "a whole number in [1, {}]"),
        (limits.max_temperature, o.temperature, "temperature", "a number in [0, {}]"),
        (limits.max_stop, len(o.stop), "stop", "at most {} strings"),
    ]
    for limit, value, name, expected in checks:
        if limit is not None and value > limit:
            got = o.stop if name == "stop" else value
            raise RequestError(f"{names.get(name, name)}: expected {expected.format(limit)} on this server, "
                               f"got {got!r}")


def weights(value, engine, normalised: bool = False, name: str = "weights") -> dict[str, float]:
    """{ARM name: weight} checked against the engine's profile: every ARM named in the result."""
    if value is not None and not isinstance(value, Mapping):
        raise RequestError(f"{name}: expected an object of ARM name to number, e.g. {{\"harmlessness\": 2}}; "
                           f"got {type(value).__name__}")
    try:
        return engine.check_weights(dict(value or {}), normalised)
    except RequestError as e:  # names the ARM and the profile's ARMs
        raise RequestError(f"{name}: {e}") from None


def panes(weights_value, panes_value, engine, normalised: bool = False, limits: Limits = NO_LIMITS,
          names: Mapping[str, str] | None = None) -> tuple[dict[str, float], ...]:
    names = names or {}
    if panes_value is None:
        return (weights(weights_value, engine, normalised, names.get("weights", "weights")),)
    shown = names.get("panes", "panes")
    if weights_value is not None:
        raise RequestError(f"{shown}: give either {names.get('weights', 'weights')} (one setting) or {shown}, "
                           "not both")
    if not isinstance(panes_value, (list, tuple)) or not panes_value:
        raise RequestError(f"{shown}: expected a non-empty list of weight settings, e.g. [{{}}, "
                           f"{{\"harmlessness\": 2}}]")
    if limits.max_panes is not None and len(panes_value) > limits.max_panes:
        raise RequestError(f"{shown}: expected at most {limits.max_panes} on this server, got {len(panes_value)}")
    return tuple(weights(w, engine, normalised, f"{shown}[{i}]") for i, w in enumerate(panes_value))


def check_prompt(prompt, limits: Limits = NO_LIMITS, name: str = "prompt"):
    """A text or a list of chat messages ({"role": system|user|assistant, "content": text}). Token
    limits are the engine's (Engine.encode)."""
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or set(m) - {"role", "content"}:
                raise RequestError(f"{name}[{i}]: expected {{\"role\": ..., \"content\": ...}}, got {m!r:.80}")
            if m.get("role") not in ROLES:
                raise RequestError(f"{name}[{i}].role: expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise RequestError(f"{name}[{i}].content: expected text, got {type(m.get('content')).__name__}")
        chars = sum(len(m["content"]) for m in prompt)
    else:
        raise RequestError(f"{name}: expected text or a non-empty list of chat messages, got "
                           f"{type(prompt).__name__}")
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise RequestError(f"{name}: {chars} characters; this server accepts at most {limits.max_prompt_chars}")
    return [dict(m) for m in prompt] if isinstance(prompt, list) else prompt
