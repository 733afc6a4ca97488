"""Where the project keeps what it makes once per machine (converted models, measured plans,
built kernels): $GENARM_CACHE, default ~/.cache/genarm."""
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GENARM_CACHE", Path.home() / ".cache" / "genarm"))
