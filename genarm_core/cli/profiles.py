"""`profiles`: list the profiles of the models file."""
from ..config import load_config


def register(sub):
    sub.add_parser("profiles", help="list the profiles").set_defaults(func=run)


def run(args):
    config = load_config(args.config)
    for name, p in config.profiles.items():
        mark = "*" if name == config.default_profile else " "
        arms = ", ".join(f"{a.name} [{a.weight_min}, {a.weight_max}]" for a in p.arms) or "no ARMs"
        print(f"{mark} {name}: base {p.base.describe()}; {arms}")
