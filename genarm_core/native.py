"""The project's own decoding kernels (csrc/native.cpp): y = x W^T with W dense float32 or
in GGUF's Q4_1 / Q8_0 blocks, every output computed by the same float operations whatever the
number of rows (batch-invariant by construction). Built once per machine with torch's C++
extension tools (about a minute on 2 cores; `bash setup.sh` does it) and cached with the other
files of $GENARM_CACHE. Where it cannot be built or run (no compiler, a CPU without AVX2 and
FMA, GENARM_NATIVE=0) the engine runs without it and says why (kernels.capabilities)."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "native.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]

_state: dict = {}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (empty without a flags line; None where the
    file cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    line = next((line for line in lines if line.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


def cpu_has_avx2_fma() -> bool:
    flags = cpu_flags()
    if flags is None:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return {"avx2", "fma"} <= flags


def build_dir() -> Path:
    from .paths import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + [torch.__version__, sys.version]).encode()).hexdigest()[:12]
    return cache_dir() / "native" / key


def load(log=None):
    """The compiled module, or None; why_not() says why it is None."""
    if "module" in _state:
        return _state["module"]
    module, why = None, ""
    if os.environ.get("GENARM_NATIVE", "1") == "0":
        why = "switched off (GENARM_NATIVE=0)"
    elif not cpu_has_avx2_fma():
        why = "this CPU has no AVX2 and FMA"
    else:
        try:
            module = _build(log)
        except Exception as e:  # noqa: BLE001 - no compiler, a failed build: run without it
            why = f"not built: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    _state.update(module=module, why=why)
    return module


def why_not() -> str:
    return _state.get("why", "")


def _build(log):
    from torch.utils import cpp_extension

    bin_dir = str(Path(sys.executable).parent)  # the venv's ninja, also when the venv is not activated
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fresh = not any(folder.glob("*.so"))
    if fresh and log:
        log("building the native kernels (once per machine, about a minute)...")
    t0 = time.perf_counter()
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    module = cpp_extension.load(name=f"genarm_rowmm_{folder.name}", sources=[str(SOURCE)], extra_cflags=FLAGS,
                                extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    if fresh and log:
        log(f"built in {time.perf_counter() - t0:.0f} s")
    return module


if __name__ == "__main__":  # python -m genarm_core.native: build now (setup.sh)
    log = lambda msg: print(f"[genarm] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    print("native kernels:", "ready" if load(log) is not None else f"not available: {why_not()}")
