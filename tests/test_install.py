"""install.py: installs only what is missing, never PyPI gguf, never twice.

Forge's real ``launch`` module is Forge's; here a stand-in records the calls,
both in-process and the way Forge runs the hook (``python install.py`` with
``launch`` importable)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_install():
    spec = importlib.util.spec_from_file_location("forge_gguf_lora_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeLaunch(types.SimpleNamespace):
    """``launch`` with a set of installed distributions; run_pip 'installs'."""

    def __init__(self, installed):
        super().__init__(installed=set(installed), pip_calls=[], checked=[])

    def is_installed(self, name):
        self.checked.append(name)
        return name in self.installed

    def run_pip(self, args, desc=None):
        self.pip_calls.append(args)
        assert args.startswith("install ")
        self.installed.add(args.split()[1])


def test_nothing_missing_installs_nothing():
    launch = FakeLaunch({"safetensors", "tqdm", "torch", "numpy", "gradio"})
    assert load_install().main(launch) == []
    assert launch.pip_calls == []


def test_installs_only_what_is_missing_and_only_once():
    launch = FakeLaunch({"tqdm"})
    inst = load_install()
    assert inst.main(launch) == ["safetensors"]
    assert launch.pip_calls == ["install safetensors"]
    inst.main(launch)  # idempotent: a second start finds it installed
    assert launch.pip_calls == ["install safetensors"]


def test_never_installs_gguf_torch_numpy_or_gradio():
    launch = FakeLaunch(set())  # even when everything is missing
    load_install().main(launch)
    assert sorted(launch.pip_calls) == ["install safetensors", "install tqdm"]
    joined = " ".join(launch.pip_calls)
    for name in ("gguf", "torch", "numpy", "gradio"):
        assert name not in joined
    assert "==" not in joined and "<" not in joined and "--upgrade" not in joined and "-U" not in joined.split()


def test_as_forge_runs_it(tmp_path):
    """``python install.py`` with a ``launch`` module on the path, as Forge's launcher does."""
    record = tmp_path / "calls.json"
    (tmp_path / "launch.py").write_text(
        "import json, os\n"
        f"REC = {str(record)!r}\n"
        "INSTALLED = {'tqdm'}\n"
        "def _log(entry):\n"
        "    calls = json.load(open(REC)) if os.path.exists(REC) else []\n"
        "    calls.append(entry)\n"
        "    json.dump(calls, open(REC, 'w'))\n"
        "def is_installed(name):\n"
        "    _log(['is_installed', name])\n"
        "    return name in INSTALLED\n"
        "def run_pip(command, desc=None, live=False):\n"
        "    _log(['run_pip', command, desc])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = json.loads(record.read_text())
    assert ["is_installed", "safetensors"] in calls and ["is_installed", "tqdm"] in calls
    pips = [c for c in calls if c[0] == "run_pip"]
    assert len(pips) == 1 and pips[0][1] == "install safetensors" and "forge-gguf-lora" in pips[0][2]


def test_with_forges_real_is_installed_semantics():
    """Forge's ``is_installed`` looks up distributions (then import specs); the names
    we ask for must be found that way in an environment that has them."""
    import importlib.metadata

    inst = load_install()

    def is_installed(name):  # the lookup Forge's launch_utils.is_installed does
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return importlib.util.find_spec(name) is not None

    calls = []
    launch = types.SimpleNamespace(is_installed=is_installed, run_pip=lambda *a, **k: calls.append(a))
    pytest.importorskip("safetensors")
    pytest.importorskip("tqdm")
    assert inst.main(launch) == [] and calls == []
