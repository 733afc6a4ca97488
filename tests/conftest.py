"""Tiny models of real architectures (Llama, Qwen2) with random weights and SmolLM2's real
tokenizer, saved as folders that profiles load like any other model."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# measured product plans go to a folder of this test run, never to the user's ~/.cache/genarm
os.environ["GENARM_TUNING_CACHE"] = tempfile.mkdtemp(prefix="genarm-tuning-")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TOKENIZER_DIR = Path(__file__).parent / "assets" / "smollm2_tokenizer"



@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def make_model(tokenizer, arch="llama", seed=0, hidden=64, layers=2):
    """A random causal LM. Logits are spread out (large init) so that sampling and top-k/top-p
    have real choices to make."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cls_config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                        tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def save_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_lora(base, folder: Path, seed: int, r=4, targets=("q_proj", "v_proj", "o_proj"), layers=None,
              **config) -> Path:
    """A LoRA adapter with random (non-zero) weights on both matrices, saved as PEFT does.
    layers: PEFT's layers_to_transform (None: every layer)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = dict(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                  task_type="CAUSAL_LM", layers_to_transform=layers, **config)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def merged(base, adapter_dir: Path):
    """An independent model: the base with the adapter merged into its weights."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().eval()


def profile_dict(base_dir, arms=(), **extra):
    profile = {"base": {"path": str(base_dir)}, "device": "cpu", "dtype": "float32", "arms": list(arms)}
    profile.update(extra)
    return {"default_profile": "tiny", "profiles": {"tiny": profile}}


def engine_for(base_dir, arms=(), **extra):
    from genarm_core.config import parse_config
    from genarm_core.engine import Engine
    from genarm_core.models import load_models

    return Engine(load_models(parse_config(profile_dict(base_dir, arms, **extra)).profile()))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """A base (Llama), two LoRA ARMs on it, and a standalone Qwen2 ARM of a different size."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_model(tokenizer, "llama", seed=0)
    save_model(base, tokenizer, root / "base")
    make_lora(base, root / "help", seed=1)
    make_lora(base, root / "harm", seed=2)
    small = make_model(tokenizer, "qwen2", seed=3, hidden=32, layers=1)
    save_model(small, tokenizer, root / "small")
    return {"root": root, "base": base, "small": small,
            "help": merged(base, root / "help"), "harm": merged(base, root / "harm")}


@pytest.fixture(scope="session")
def arms_spec(tiny):
    root = tiny["root"]
    return [{"name": "help", "adapter": str(root / "help"), "beta": 0.5},
            {"name": "harm", "adapter": str(root / "harm"), "beta": 0.01},
            {"name": "small", "model": {"path": str(root / "small")}, "beta": 1.0}]


@pytest.fixture(scope="session")
def engine(tiny, arms_spec):
    return engine_for(tiny["root"] / "base", arms_spec)


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are programs, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
