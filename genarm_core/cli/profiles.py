"""`profiles`: list the profiles of the models file and what this machine offers; `--load` loads
one and says how it runs here (dtype and why, product forms, batch invariance and why)."""
import torch

from ..config import load_config
from ..kernels import _cpu_name, capabilities


def register(sub):
    p = sub.add_parser("profiles", help="list the profiles; --load: how one runs on this machine")
    p.add_argument("--load", action="store_true",
                   help="load the profile (--profile, default: the default one) and print how it runs here")
    p.set_defaults(func=run)


def run(args):
    config = load_config(args.config)
    for name, p in config.profiles.items():
        mark = "*" if name == config.default_profile else " "
        arms = ", ".join(f"{a.name} [{a.weight_min}, {a.weight_max}]" for a in p.arms) or "no ARMs"
        print(f"{mark} {name}: base {p.base.describe()}; {arms}")
    print(f"\nthis machine: {_cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"cuda {'yes' if torch.cuda.is_available() else 'no'}")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"  cpu {str(dtype).replace('torch.', '')} product forms: {capabilities('cpu', dtype).describe()}")
    if args.load:
        from ..engine import Engine

        engine = Engine.from_profile(args.profile, args.config)
        print(f"\nprofile {engine.profile.name} as loaded here:")
        for line in engine.models.runtime.lines():
            print(f"  {line}")
