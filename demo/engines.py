"""Which models the demo serves: one engine per offered profile, loaded on first use and shared by
every session. Visitors can pick only the profiles under models.yaml's `demo:` list; failures are
kept as messages for the page, never raised."""
from __future__ import annotations

import threading
from dataclasses import replace

from genarm_core import ConfigError, Engine, ModelLoadError, load_config, load_models
from genarm_core.models import hub_reachable


class Engines:
    """One engine per profile, loaded on first use and shared by all sessions (the engine is
    thread-safe at token granularity). Failures are kept as messages, never raised."""

    def __init__(self, profiles: dict, engine: Engine | None = None, default: str | None = None):
        self.profiles = profiles
        self.default = default or (engine.profile.name if engine else next(iter(profiles), None))
        self._loaded: dict[str, tuple[Engine | None, str]] = {}
        self._locks = {name: threading.Lock() for name in profiles}  # one load at a time per profile
        if engine is not None:
            self._loaded[engine.profile.name] = (engine, notes_for(engine, engine.profile))

    def get(self, name: str) -> tuple[Engine | None, str]:
        if not isinstance(name, str) or name not in self.profiles:
            offered = ", ".join(f"`{n}`" for n in self.profiles)
            return None, f"**Profile `{str(name)[:80]}` is not offered here** (offered: {offered})."
        if name not in self._loaded:
            with self._locks.get(name, threading.Lock()):
                if name not in self._loaded:
                    self._loaded[name] = self._load(name)
        return self._loaded[name]

    def loaded(self, name: str) -> bool:
        return name in self._loaded

    def _load(self, name: str) -> tuple[Engine | None, str]:
        profile = self.profiles.get(name)
        if profile is None:
            return None, f"**Unknown profile `{name}`.**"
        hub = [s.hub for s in [profile.base, *(a.model for a in profile.arms)] if s is not None and s.hub]
        if hub and not hub_reachable():  # fail fast: offline, transformers retries for minutes
            return None, (f"**Profile `{name}` cannot be loaded:** it needs `{hub[0]}` from the "
                          "Hugging Face hub, which this machine cannot reach.")
        try:
            engine = Engine(load_models(profile))
            return engine, notes_for(engine, profile)
        except (ModelLoadError, ConfigError, OSError, ValueError, RuntimeError) as e:
            first = str(e)
        if profile.arms:  # maybe only the ARMs are missing: run the base alone
            try:
                engine = Engine(load_models(replace(profile, arms=())))
                return engine, (f"**The reward models of profile `{name}` could not be loaded**, so "
                                f"this page runs the **base model only** (both panes show it, no "
                                f"sliders).\n\n`{first}`")
            except (ModelLoadError, ConfigError, OSError, ValueError, RuntimeError):
                pass
        return None, f"**Profile `{name}` cannot be loaded.**\n\n`{first}`"


def notes_for(engine: Engine, profile) -> str:
    if not engine.arm_names:
        return (f"**Profile `{profile.name}` has no reward models (ARMs) yet** (`arms: []` in "
                "models.yaml), so both panes show the base model and there are no sliders. "
                "Add trained ARMs to the profile to steer.")
    return ""


def read_profiles(engine: Engine | None, config_path) -> tuple[dict, str, str]:
    """Profiles offered to visitors (models.yaml's `demo:` list), the default one, and a config
    error message (or ""). Other profiles need the operator: visitors cannot load them."""
    profiles, default, error = {}, None, ""
    if engine is None or config_path is not None:
        try:
            config = load_config(config_path)
            profiles = {n: config.profiles[n] for n in config.demo_profiles}
            default = config.default_profile if config.default_profile in profiles else next(iter(profiles))
        except ConfigError as e:
            error = f"**models.yaml cannot be read.**\n\n`{e}`"
    if engine is not None:
        profiles[engine.profile.name] = engine.profile
        default = engine.profile.name
    return profiles, default, error
