"""`models.yaml`: named profiles (a base model, its ARMs, decoding defaults), validated with
errors that name the file, the profile, the field and what was expected."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, RequestError
from .options import SamplingOptions
from .request import SAMPLING_NAMES, options

BUILTIN_MODELS = {"smollm2-135m-instruct"}
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "models.yaml"


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of: a local folder, a hub id, or a model that ships offline (builtin)."""
    path: str | None = None
    hub: str | None = None
    builtin: str | None = None
    revision: str | None = None
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")
        return f"path:{self.path}"


@dataclass(frozen=True)
class ArmSpec:
    """An ARM: a LoRA adapter on the base (`adapter` only), a standalone causal LM (`model` only),
    or a LoRA adapter on a backbone of its own (`model` and `adapter`: weak-to-strong, e.g. 135M
    ARMs guiding a 1.7B base). ARMs on the same `model` run as rows of one backbone."""
    name: str
    label: str
    adapter: str | None = None  # a local PEFT folder
    adapter_hub: str | None = None  # or a hub repository of one (downloaded at load)
    adapter_revision: str | None = None
    model: ModelSource | None = None
    beta: float | None = None  # None: read from the adapter's metadata
    weight_min: float = -2.0
    weight_max: float = 4.0
    weight_default: float = 1.0
    description: str = ""


WEIGHTS = ("auto", "dense", "int4", "int8")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a profile; every switch exists to measure its effect (bench_decode.py)."""
    shared_trunk: bool = True  # layers below the ARMs' first adapted layer run once per sequence
    batched_lora: bool = True  # one product per module for all LoRA ARMs (False: one per ARM)
    forms: str = "auto"  # auto: the product forms measured fastest on this machine; plain: F.linear
    batch_invariant: bool = True  # where the machine has batch-invariant forms, use only those
    max_rows: int | None = None  # model rows decoded at once (None: 64 on CPU, 512 on GPU)
    weights: str = "auto"  # dense | int4 (Q4_1 layers, Q8_0 head) | int8 (Q8_0) | auto: measured (models.py)
    native_step: bool = True  # decode steps with the project's native kernels where they run (native.py)
    step_tokens: int | None = None  # tokens per step, decode + prompt chunks (None: 32 on CPU, 2048 on GPU)


@dataclass(frozen=True)
class Profile:
    name: str
    base: ModelSource
    arms: tuple[ArmSpec, ...] = ()
    description: str = ""
    device: str = "auto"
    dtype: str = "auto"
    chat_template: bool | str = True  # or a Jinja chat template of the profile's own
    system_prompt: str | None = None
    max_prompt_tokens: int | None = None
    defaults: SamplingOptions = field(default_factory=lambda: SamplingOptions(top_p=0.9))
    engine: EngineOptions = field(default_factory=EngineOptions)

    def arm(self, name: str) -> ArmSpec:
        for arm in self.arms:
            if arm.name == name:
                return arm
        known = ", ".join(a.name for a in self.arms) or "none"
        raise ConfigError(f"profile '{self.name}' has no ARM named '{name}' (its ARMs: {known})")


@dataclass(frozen=True)
class ModelsConfig:
    path: Path
    default_profile: str
    profiles: dict[str, Profile]
    demo: tuple[str, ...] = ()  # the profiles a demo visitor may pick (default: the default one)

    @property
    def demo_profiles(self) -> tuple[str, ...]:
        return self.demo or (self.default_profile,)

    def profile(self, name: str | None = None) -> Profile:
        name = name or self.default_profile
        if name not in self.profiles:
            raise ConfigError(f"{self.path}: no profile named '{name}' "
                              f"(profiles: {', '.join(self.profiles)})")
        return self.profiles[name]


class _Fields:
    """Reads a YAML mapping and raises errors naming where a bad value sits."""

    def __init__(self, data, where: str, allowed: set[str]):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        self.data, self.where = data, where

    def get(self, key, kind, default=None, required=False):
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self.where}: missing required field '{key}'")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.where}.{key}: expected a finite number, got {value}")
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ConfigError(f"{self.where}.{key}: expected {kind.__name__}, "
                              f"got {type(value).__name__} ({value!r})")
        return value


def _resolve(path: str, root: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (root / p))


def _model_source(data, where: str, root: Path) -> ModelSource:
    f = _Fields(data, where, {"path", "hub", "builtin", "revision", "gguf_file"})
    path, hub, builtin = f.get("path", str), f.get("hub", str), f.get("builtin", str)
    if sum(x is not None for x in (path, hub, builtin)) != 1:
        raise ConfigError(f"{where}: expected exactly one of 'path', 'hub', 'builtin'")
    if builtin is not None and builtin not in BUILTIN_MODELS:
        raise ConfigError(f"{where}.builtin: expected one of {sorted(BUILTIN_MODELS)}, got '{builtin}'")
    return ModelSource(path=_resolve(path, root) if path else None, hub=hub, builtin=builtin,
                       revision=f.get("revision", str), gguf_file=f.get("gguf_file", str))


def _adapter(data, where: str, root: Path):
    """An adapter: a folder (a string, or {path}), or {hub, revision} -> (hub, revision)."""
    if data is None:
        return None
    if isinstance(data, str):
        return _resolve(data, root)
    f = _Fields(data, where, {"path", "hub", "revision"})
    path, hub = f.get("path", str), f.get("hub", str)
    if (path is None) == (hub is None):
        raise ConfigError(f"{where}: expected a folder, or exactly one of 'path' and 'hub'")
    return _resolve(path, root) if path else (hub, f.get("revision", str))


def _arm(data, where: str, root: Path) -> ArmSpec:
    f = _Fields(data, where, {"name", "label", "adapter", "model", "beta", "weight", "description"})
    name = f.get("name", str, required=True)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{where}.name: expected letters, digits, '-' or '_', got '{name}'")
    adapter, model, hub, revision = _adapter(data.get("adapter") if isinstance(data, dict) else None,
                                             f"{where}.adapter", root), f.get("model", dict), None, None
    if isinstance(adapter, tuple):
        adapter, hub, revision = None, *adapter
    if adapter is None and hub is None and model is None:
        raise ConfigError(f"{where}: expected 'adapter' (a LoRA adapter on the base), 'model' (a standalone "
                          "causal LM) or both (a LoRA adapter on that model)")
    beta = f.get("beta", float)
    if beta is not None and beta <= 0:
        raise ConfigError(f"{where}.beta: expected a positive number, got {beta}")
    w = _Fields(f.get("weight", dict, default={}), f"{where}.weight", {"min", "max", "default"})
    lo, hi = w.get("min", float, -2.0), w.get("max", float, 4.0)
    default = w.get("default", float, min(max(1.0, lo), hi))
    if not lo <= default <= hi:
        raise ConfigError(f"{where}.weight: expected min <= default <= max, got {lo}, {default}, {hi}")
    return ArmSpec(name=name, label=f.get("label", str, name.capitalize()),
                   adapter=adapter, adapter_hub=hub, adapter_revision=revision,
                   model=_model_source(model, f"{where}.model", root) if model else None,
                   beta=beta, weight_min=lo, weight_max=hi, weight_default=default,
                   description=f.get("description", str, ""))


def _defaults(data, where: str) -> SamplingOptions:
    """A profile's sampling defaults: any option of the request schema; top_p 0.9 unless given."""
    f = _Fields(data, where, set(SAMPLING_NAMES))
    try:
        return options(f.data, SamplingOptions(top_p=0.9))
    except RequestError as e:
        raise ConfigError(f"{where}.{e}") from None


def _engine(data, where: str) -> EngineOptions:
    f = _Fields(data, where, {"shared_trunk", "batched_lora", "forms", "batch_invariant", "max_rows", "weights",
                                  "native_step", "step_tokens"})
    forms = f.get("forms", str, "auto")
    if forms not in ("auto", "plain"):
        raise ConfigError(f"{where}.forms: expected auto or plain, got '{forms}'")
    weights = f.get("weights", str, "auto")
    if weights not in WEIGHTS:
        raise ConfigError(f"{where}.weights: expected one of {', '.join(WEIGHTS)}, got '{weights}'")
    max_rows = f.get("max_rows", int)
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"{where}.max_rows: expected an integer >= 1, got {max_rows}")
    step_tokens = f.get("step_tokens", int)
    if step_tokens is not None and step_tokens < 1:
        raise ConfigError(f"{where}.step_tokens: expected an integer >= 1, got {step_tokens}")
    return EngineOptions(shared_trunk=f.get("shared_trunk", bool, True), batched_lora=f.get("batched_lora", bool, True),
                         forms=forms, batch_invariant=f.get("batch_invariant", bool, True), max_rows=max_rows,
                         weights=weights, native_step=f.get("native_step", bool, True), step_tokens=step_tokens)


def _chat_template(f: _Fields, where: str) -> bool | str:
    """true: the tokenizer's chat template; false: raw text; a string: this Jinja template."""
    value = f.data.get("chat_template", True)
    if not isinstance(value, (bool, str)) or value == "":
        raise ConfigError(f"{where}.chat_template: expected true, false or a Jinja template, got {value!r}")
    return value


def _profile(name: str, data, where: str, root: Path) -> Profile:
    f = _Fields(data, where, {"base", "arms", "description", "device", "dtype", "chat_template",
                              "system_prompt", "max_prompt_tokens", "defaults", "engine"})
    arms_data = f.get("arms", list, default=[])
    arms = tuple(_arm(a, f"{where}.arms[{i}]", root) for i, a in enumerate(arms_data))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.arms: ARM names must be unique, got {names}")
    dtype = f.get("dtype", str, "auto")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}.dtype: expected auto, float32, bfloat16 or float16, got '{dtype}'")
    device = f.get("device", str, "auto")
    if not (device in ("auto", "cpu", "mps") or device.startswith("cuda")):
        raise ConfigError(f"{where}.device: expected auto, cpu, mps, cuda or cuda:N, got '{device}'")
    max_prompt = f.get("max_prompt_tokens", int)
    if max_prompt is not None and max_prompt < 1:
        raise ConfigError(f"{where}.max_prompt_tokens: expected an integer >= 1, got {max_prompt}")
    return Profile(name=name, base=_model_source(f.get("base", dict, required=True), f"{where}.base", root),
                   arms=arms, description=f.get("description", str, ""), device=device, dtype=dtype,
                   chat_template=_chat_template(f, where),
                   system_prompt=f.get("system_prompt", str), max_prompt_tokens=max_prompt,
                   defaults=_defaults(f.get("defaults", dict, default={}), f"{where}.defaults"),
                   engine=_engine(f.get("engine", dict, default={}), f"{where}.engine"))


def parse_config(data, path: Path | str = "<memory>", root: Path | None = None) -> ModelsConfig:
    path = Path(path)
    root = root or path.parent
    f = _Fields(data, str(path), {"default_profile", "profiles", "demo"})
    profiles_data = f.get("profiles", dict, required=True)
    if not profiles_data:
        raise ConfigError(f"{path}: 'profiles' is empty; expected at least one profile")
    profiles = {str(n): _profile(str(n), p, f"{path}: profiles.{n}", root) for n, p in profiles_data.items()}
    default = f.get("default_profile", str, default=next(iter(profiles)))
    if default not in profiles:
        raise ConfigError(f"{path}: default_profile '{default}' is not one of the profiles "
                          f"({', '.join(profiles)})")
    demo = f.get("demo", list, default=[])
    for i, name in enumerate(demo):
        if name not in profiles:
            raise ConfigError(f"{path}: demo[{i}]: '{name}' is not one of the profiles ({', '.join(profiles)})")
    return ModelsConfig(path=path, default_profile=default, profiles=profiles, demo=tuple(demo))


def load_config(path: Path | str | None = None) -> ModelsConfig:
    path = Path(path or os.environ.get("GENARM_MODELS", DEFAULT_CONFIG))
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read models file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, path)
