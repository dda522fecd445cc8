"""The distribution's import packages: names, import hygiene."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nested_reft", "r1t1", "rewards", "reft_kernels", "archs")


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_packages_import_from_the_install(tmp_path):
    code = "import " + ", ".join(PACKAGES) + "; print(','.join(m.__name__ for m in (" + ", ".join(PACKAGES) + ",)))"
    assert _run(code, tmp_path) == ",".join(PACKAGES)


def test_our_kernels_package_does_not_shadow_hugging_face_kernels(tmp_path):
    """transformers answers is_kernels_available() the same with the project installed and on the path."""
    code = "from transformers.utils.import_utils import is_kernels_available as f; print(f())"
    expected = str(importlib.util.find_spec("kernels") is not None)
    # From an unrelated folder (installed project) and from the repo root (its folders on sys.path).
    assert _run(code, tmp_path) == expected
    assert _run(code, ROOT) == expected
    assert not (ROOT / "kernels").exists()


def test_importing_every_module_pulls_in_neither_vllm_nor_deepspeed(tmp_path):
    """None of our modules imports vllm or deepspeed at import time (only inside the functions
    that use them). Checked on the import statements themselves: with vLLM installed, TRL's
    GRPOTrainer module imports it whatever we do, so `sys.modules` alone cannot tell."""
    code = (
        "import builtins, importlib, pkgutil\n"
        f"ours = {PACKAGES!r}\n"
        "culprits, original = set(), builtins.__import__\n"
        "def spy(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    importer = (globals or {}).get('__name__', '')\n"
        "    if level == 0 and name.split('.')[0] in ('vllm', 'deepspeed') and importer.split('.')[0] in ours:\n"
        "        culprits.add(importer)\n"
        "    return original(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = spy\n"
        "count = 0\n"
        "for name in ours:\n"
        "    pkg = importlib.import_module(name)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, name + '.'):\n"
        "        if not m.name.endswith('_worker') and '.vllm' not in m.name:\n"
        "            importlib.import_module(m.name)\n"
        "            count += 1\n"
        "print(sorted(culprits), count > 10)\n"
    )
    assert _run(code, tmp_path) == "[] True"
