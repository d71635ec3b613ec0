"""The ctypes struct layouts must match the C compiler's view of llama.h."""

import ctypes
import subprocess

import pytest

from engine import llama_cpp

pytestmark = pytest.mark.model

PROBE = llama_cpp.library_path().parent / "abi_probe"


def c_layout() -> dict[str, int]:
    if not PROBE.exists():
        pytest.fail(f"{PROBE} is missing: run ./build_llama.sh")
    out = subprocess.run([str(PROBE)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", llama_cpp.STRUCTS, ids=lambda s: s.__name__)
def test_struct_layout_matches_c(struct):
    layout = c_layout()
    name = struct.__name__
    assert ctypes.sizeof(struct) == layout[name], f"sizeof({name})"
    c_fields = {k.split(".", 1)[1]: v for k, v in layout.items() if k.startswith(name + ".")}
    py_fields = {f[0]: getattr(struct, f[0]).offset for f in struct._fields_}
    assert py_fields == c_fields


def test_library_reports_version():
    assert llama_cpp.lib.llama_version()
