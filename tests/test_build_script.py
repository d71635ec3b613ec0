"""build_llama.sh keeps one build directory whose contents only grow: the README's two set-up commands,
in either order, never rebuild libllama or lose the reference tools. Its CUDA build from NVIDIA's PyPI
wheels configures on this machine without a GPU or a CUDA install."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "native" / "build" / "bin"


def build(*flags, build_dir: Path | None = None) -> float:
    env = {**os.environ, "SENTIRIC_BUILD_DIR": str(build_dir)} if build_dir else None
    started = time.monotonic()
    done = subprocess.run(["./build_llama.sh", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started


def cmake_cache(build_dir: Path) -> dict[str, str]:
    lines = (build_dir / "CMakeCache.txt").read_text().splitlines()
    return dict(re.match(r"([^:#/]+):[A-Z]+=(.*)", line).groups() for line in lines if re.match(r"[^:#/]+:[A-Z]+=", line))


@pytest.mark.unit
def test_plain_and_server_builds_in_any_order_redo_nothing():
    build("--server")  # the tests' set-up already built everything: a no-op, or whatever was missing
    library = (BIN / "libllama.so").resolve().stat().st_mtime_ns
    for flags in ((), ("--server",), ()):
        assert build(*flags) < 5
        assert (BIN / "llama-server").exists() and (BIN / "llama-batched-bench").exists()
    assert (BIN / "libllama.so").resolve().stat().st_mtime_ns == library


@pytest.mark.unit
def test_help_names_the_backends():
    done = subprocess.run(["./build_llama.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--cuda" in done.stdout and "--server" in done.stdout


@pytest.mark.unit
def test_cuda_from_pip_configures_without_a_gpu(tmp_path):
    """The CUDA options reach CMake and its configure accepts the toolkit made of NVIDIA's wheels (installed
    once into the cache, ~570 MB). Compiling the CUDA backend takes 18 min of this machine's 2 cores (README), so
    CI stops there."""
    stamp = (BIN / ".build-stamp").stat().st_mtime_ns
    build("--cuda-from-pip", "--cuda-arch", "90", "--configure-only", build_dir=tmp_path)
    cache = cmake_cache(tmp_path)
    toolkit = Path(cache["CUDAToolkit_ROOT"])
    assert toolkit.name == "cu13" and not toolkit.is_relative_to("/usr/local")  # not the system's partial CUDA
    assert (cache["GGML_CUDA"], cache["CMAKE_CUDA_ARCHITECTURES"], cache["GGML_CUDA_NO_VMM"]) == ("ON", "90", "ON")
    assert cache["CMAKE_CUDA_COMPILER"] == str(toolkit / "bin" / "nvcc")
    assert Path(cache["CUDA_cublas_LIBRARY"]).parent == toolkit / "lib"
    compiler = next(tmp_path.glob("CMakeFiles/*/CMakeCUDACompiler.cmake")).read_text()
    assert 'CMAKE_CUDA_COMPILER_VERSION "13.0.88"' in compiler
    # cuBLAS is found at run time through libggml-cuda's rpath
    link = next(tmp_path.glob("**/ggml-cuda.dir/linkLibs.rsp")).read_text()
    assert str(toolkit / "lib") in re.search(r"-rpath,(\S+)", link).group(1)
    assert not (tmp_path / "bin" / "libllama.so").exists()  # configured, nothing compiled
    assert build("--cuda-from-pip", "--cuda-arch", "90", "--configure-only", build_dir=tmp_path) < 5
    # dropping the CUDA options reconfigures the same directory back to the CPU backend
    build("--configure-only", build_dir=tmp_path)
    assert cmake_cache(tmp_path)["GGML_CUDA"] == "OFF" and "CUDAToolkit_ROOT" not in cmake_cache(tmp_path)
    assert (BIN / ".build-stamp").stat().st_mtime_ns == stamp  # native/build untouched
