"""install.py: installs only what is missing, never PyPI gguf, never twice.

A stand-in ``launch`` (a set of installed names, a recording ``run_pip``) drives the
logic, in-process and the way Forge runs the hook (``python install.py`` with
``launch`` importable); with a Forge checkout (FORGE_DIR) Forge's own
``is_installed`` answers in Forge's interpreter."""
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


FORGE_DIR = os.environ.get("FORGE_DIR")

@pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR (and FORGE_PYTHON) to a Forge checkout")
def test_with_forges_own_is_installed():
    """Forge's ``launch_utils.is_installed``, in Forge's interpreter: what Forge has
    installed is found (nothing to install), and a requirement it lacks is installed once."""
    code = (
        "import importlib.util, json, os, sys, types\n"
        "sys.path.insert(0, os.environ['FORGE_DIR'])\n"
        "from modules.launch_utils import is_installed\n"
        "spec = importlib.util.spec_from_file_location('install_under_test', sys.argv[1])\n"
        "inst = importlib.util.module_from_spec(spec); spec.loader.exec_module(inst)\n"
        "calls = []\n"
        "launch = types.SimpleNamespace(is_installed=is_installed, run_pip=lambda a, d=None: calls.append(a))\n"
        "first = inst.main(launch)\n"
        "inst.REQUIREMENTS = inst.REQUIREMENTS + (('forge_gguf_lora_absent_pkg', 'forge_gguf_lora_absent_pkg'),)\n"
        "second = inst.main(launch)\n"
        "print(json.dumps([is_installed.__module__, first, second, calls]))\n")
    py = os.environ.get("FORGE_PYTHON", sys.executable)
    out = subprocess.run([py, "-c", code, str(ROOT / "install.py")], capture_output=True, text=True, timeout=120,
                         cwd=FORGE_DIR, env=dict(os.environ, FORGE_DIR=FORGE_DIR, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr
    module, first, second, calls = json.loads(out.stdout.strip().splitlines()[-1])
    assert module == "modules.launch_utils"
    assert first == [] and second == ["forge_gguf_lora_absent_pkg"]
    assert calls == ["install forge_gguf_lora_absent_pkg"]
