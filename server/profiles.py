"""Model profiles: named sets of model, hardware, sampling and prompt settings (--profiles FILE, JSON or
TOML; see deploy/profiles.example.toml). A profile sets only what it names: everything else comes from the
command line, so without a file the flags form one implicit profile, as before.

A profile is applied by overriding the `serve` flags it names (Profile.apply); the CLI builds an engine
from the result exactly as it does from the flags alone.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# profile field -> the `serve` flag's attribute it overrides, and the types it accepts
HARDWARE = {"ctx_size": "ctx_size", "gpu_layers": "n_gpu_layers", "threads": "threads", "batch_size": "batch_size"}
_INTEGERS = {**HARDWARE, "workers": "workers", "parallel": "parallel"}
_TEXTS = {"model": "model", "display_name": "model_alias", "system_prompt": "system_prompt",
          "rag_template": "rag_template"}
_SAMPLING = {"temperature": ("temp", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
             "min_p": ("min_p", float), "repeat_penalty": ("repeat_penalty", float), "max_tokens": ("max_tokens", int)}
_LOWEST = {"ctx_size": 1, "gpu_layers": -1, "threads": 0, "batch_size": 0, "workers": 1, "parallel": 1}
MAX_CTX = 1 << 20


class ProfileError(ValueError):
    """A profiles file (or a hardware change) the service cannot use: names the file, profile and field."""


@dataclass(frozen=True)
class Profile:
    name: str
    settings: dict = field(default_factory=dict)  # flag attribute -> value, only what the profile sets

    def apply(self, args: argparse.Namespace) -> argparse.Namespace:
        """The `serve` flags with this profile's settings in force."""
        return argparse.Namespace(**{**vars(args), **self.settings})

    def hardware(self, args: argparse.Namespace) -> dict:
        """GPU layers, threads, context and batch as they apply (the profile's, else the flags')."""
        applied = self.apply(args)
        return {name: getattr(applied, attr) for name, attr in HARDWARE.items()}

    def with_hardware(self, changes: dict) -> Profile:
        return Profile(self.name, {**self.settings, **{HARDWARE[k]: v for k, v in changes.items()}})

    def describe(self, args: argparse.Namespace) -> dict:
        """What GET /v1/profiles shows of it."""
        a = self.apply(args)
        return {"name": self.name, "display_name": a.model_alias, "model": a.model or "default",
                "workers": a.workers, "parallel": a.parallel, **self.hardware(args),
                "sampling": {k: getattr(a, attr) for k, (attr, _) in _SAMPLING.items()},
                "system_prompt": a.system_prompt, "rag_template": a.rag_template}


def load_profiles(path: str | None, implicit_name: str) -> tuple[dict[str, Profile], str | None]:
    """The profiles of the file (or one implicit, empty profile without a file) and the file's `active`."""
    if not path:
        return {implicit_name: Profile(implicit_name)}, implicit_name
    try:
        raw = Path(path).read_bytes()
        data = tomllib.loads(raw.decode()) if not path.endswith(".json") else json.loads(raw)
    except OSError as exc:
        raise ProfileError(f"profiles file {path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib / json decode errors are ValueErrors
        raise ProfileError(f"profiles file {path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: "
                           f"{exc}") from None
    where = f"profiles file {path}"
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict) or not data["profiles"]:
        raise ProfileError(f"{where}: needs a 'profiles' table of named profiles")
    unknown = sorted(set(data) - {"profiles", "active"})
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (expected 'profiles' and 'active')")
    profiles = {name: parse_profile(name, body, where) for name, body in data["profiles"].items()}
    active = data.get("active")
    if active is not None and active not in profiles:
        raise ProfileError(f"{where}: 'active' names {active!r}, which is not a profile "
                           f"(profiles: {', '.join(profiles)})")
    return profiles, active or next(iter(profiles))


def parse_profile(name: str, body, where: str) -> Profile:
    if not isinstance(body, dict):
        raise ProfileError(f"{where}: profile {name!r} must be a table of settings")
    settings = {}

    def bad(key: str, problem: str) -> ProfileError:
        return ProfileError(f"{where}: profile {name!r}: field {key!r} {problem}")

    for key, value in body.items():
        if key == "sampling":
            if not isinstance(value, dict):
                raise bad(key, "must be a table of sampling defaults")
            for skey, svalue in value.items():
                if skey not in _SAMPLING:
                    raise bad(f"sampling.{skey}", f"is not a sampling default ({', '.join(_SAMPLING)})")
                attr, kind = _SAMPLING[skey]
                if isinstance(svalue, bool) or not isinstance(svalue, (int, float)) or (
                        kind is int and not isinstance(svalue, int)) or svalue < 0:
                    raise bad(f"sampling.{skey}", f"must be a non-negative {'integer' if kind is int else 'number'}, "
                                                  f"not {svalue!r}")
                settings[attr] = kind(svalue)
        elif key in _INTEGERS:
            check_hardware(key, value, lambda problem: bad(key, problem))
            settings[_INTEGERS[key]] = value
        elif key in _TEXTS:
            if not isinstance(value, str):
                raise bad(key, f"must be a string, not {value!r}")
            if key == "rag_template" and ("{context}" not in value or "{question}" not in value):
                raise bad(key, "must contain {context} and {question}")
            settings[_TEXTS[key]] = value or None if key == "model" else value
        else:
            known = [*_TEXTS, *_INTEGERS, "sampling"]
            raise bad(key, f"is not a profile setting ({', '.join(known)})")
    return Profile(name, settings)


def check_hardware(key: str, value, error) -> None:
    """An integer setting in its range, else `error(problem)` raised."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"must be an integer, not {value!r}")
    lowest, highest = _LOWEST[key], MAX_CTX if key == "ctx_size" else 4096 if key == "workers" else 1 << 16
    if not lowest <= value <= highest:
        raise error(f"is {value}, but it must be between {lowest} and {highest}")
