"""pipeline/__init__.py's torchvision shim, for the three installs it meets.

- CPU-only torch with PyPI's (CUDA) torchvision, whose extension cannot load: this machine;
  every test that imports open_clip covers it, and the first test here checks it directly.
- A matching build whose extension loads (the CUDA images): the shim must not declare the ops
  itself, or the extension's own declaration aborts the process. Stood in for by a fake
  ``torchvision`` package whose ``_C`` is a real C++ extension declaring ``torchvision::nms``.
- No torchvision at all: nothing to do, and importing ``pipeline`` must not fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NMS_SCHEMA = "torchvision::nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

# Imports pipeline, then torchvision (whichever is on the path), then calls the op.
CHECK = """
import pipeline, torch
import torchvision
declared = hasattr(pipeline, "_TORCHVISION_FRAGMENT")
print("declared by the shim:", declared)
print(torch.ops.torchvision.nms(torch.zeros(3, 4), torch.tensor([3.0, 1.0, 2.0]), 0.5).tolist())
"""


def run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cpu_torch_with_a_torchvision_whose_extension_does_not_load() -> None:
    import torch
    import torchvision.extension

    import pipeline

    if torchvision.extension._has_ops():
        pytest.skip("torchvision's extension loads here: the shim has nothing to declare")
    assert hasattr(pipeline, "_TORCHVISION_FRAGMENT")
    assert hasattr(torch.ops.torchvision, "nms")


def test_without_torchvision_pipeline_imports(tmp_path: Path) -> None:
    hide = textwrap.dedent("""
        import importlib.machinery, sys
        class Hide(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                return None if name.partition(".")[0] == "torchvision" else super().find_spec(name, path, target)
        sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        import pipeline, torch
        print(hasattr(pipeline, "_TORCHVISION_FRAGMENT"), hasattr(torch.ops.torchvision, "nms"))
    """)
    result = run(hide)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") and shutil.which("ninja")), reason="needs a C++ compiler and ninja")
def test_matching_build_defines_the_ops_itself(tmp_path: Path) -> None:
    """~20 s: compiles a stand-in for torchvision's ``_C`` (declares nms, CPU kernel)."""
    source = tmp_path / "fake_vision.cpp"
    source.write_text(textwrap.dedent(f"""
        #include <torch/library.h>
        #include <ATen/ATen.h>
        at::Tensor nms(const at::Tensor& dets, const at::Tensor& scores, double) {{ return scores.argsort(); }}
        TORCH_LIBRARY_FRAGMENT(torchvision, m) {{ m.def(TORCH_SELECTIVE_SCHEMA("{NMS_SCHEMA}")); }}
        TORCH_LIBRARY_IMPL(torchvision, CPU, m) {{ m.impl("nms", TORCH_FN(nms)); }}
    """))
    build = tmp_path / "build"
    build.mkdir()
    # Built in a subprocess: loading it here would register the op in the test process.
    compile_code = (f"from torch.utils import cpp_extension; cpp_extension.load('fake_vision', [{str(source)!r}], "
                    f"build_directory={str(build)!r}, is_python_module=False)")
    compiled = subprocess.run([sys.executable, "-c", compile_code], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    package = tmp_path / "site" / "torchvision"
    package.mkdir(parents=True)
    shutil.copy(build / "fake_vision.so", package / "_C.so")
    package.joinpath("__init__.py").write_text(
        "import os, torch\ntorch.ops.load_library(os.path.join(os.path.dirname(__file__), '_C.so'))\n")
    result = run(CHECK, pythonpath=tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]  # declared twice: SIGABRT (-6)
    assert result.stdout.splitlines() == ["declared by the shim: False", "[1, 2, 0]"]
