"""scripts/gguf_backend.py: registration at Forge's script load, and the infotext.

With a Forge checkout (FORGE_DIR, FORGE_PYTHON) the script is loaded by Forge's own
script loader against Forge's ``modules.scripts.Script``; without one, against a
stand-in for it."""
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

import extension

ROOT = Path(__file__).resolve().parents[1]
FORGE_DIR = os.environ.get("FORGE_DIR")
stand_in_only = pytest.mark.skipif(bool(FORGE_DIR), reason="FORGE_DIR is set: Forge's own Script is tested instead")


@pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR (and FORGE_PYTHON) to a Forge checkout")
def test_in_forge_the_script_registers_and_records_the_infotext():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ui import run_forge_check

    r = run_forge_check("backend")
    assert r["registered"] and r["is_forge_script"] and r["always_visible"], r
    assert r["ui"] == ["Textbox", "GGUF LoRA"]
    assert r["pasted"] == {"Q4_K": "runtime", "Q8_0": "merge"} and r["cleared"] == {}
    assert r["infotext"] == {"GGUF LoRA": "F16:merge,Q4_K:runtime,Q8_0:merge+runtime"}


def _load(name, stand_in_forge=False, monkeypatch=None):
    if stand_in_forge:
        class Script:  # a stand-in for Forge's Script base (the no-Forge run only)
            pass

        mods = types.ModuleType("modules")
        scripts = types.ModuleType("modules.scripts")
        scripts.Script = Script
        scripts.AlwaysVisible = object()
        mods.scripts = scripts
        monkeypatch.setitem(sys.modules, "modules", mods)
        monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gguf_backend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_outside_forge_it_registers_nothing():
    mod = _load("gguf_backend_plain")
    assert not hasattr(mod, "GGUFLoraScript")
    assert mod.setup() is False  # Forge's backend is not importable here
    assert not extension.is_registered()


def _fake_model(unet_modes, clip_modes, vae_modes):
    """A Forge model's parts as the glue sees them: each part's patcher has a LoRA
    loader that keeps the modes of its own last refresh."""
    def part(modes, wrapped):
        loader = types.SimpleNamespace(_gguf_modes=modes)
        patcher = types.SimpleNamespace(lora_loader=loader, refresh_loras=lambda: None)
        return types.SimpleNamespace(patcher=patcher) if wrapped else patcher

    fo = types.SimpleNamespace(unet=part(unet_modes, False), clip=part(clip_modes, True), vae=part(vae_modes, True))
    return types.SimpleNamespace(forge_objects=fo)


@stand_in_only
def test_infotext_records_the_modes_of_every_part_of_the_model(monkeypatch):
    mod = _load("gguf_backend_forge", stand_in_forge=True, monkeypatch=monkeypatch)
    p = types.SimpleNamespace(extra_generation_params={"Seed": 1}, sd_model=_fake_model({}, {}, {}))
    script = mod.GGUFLoraScript()
    assert script.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    script.postprocess_batch(p)
    assert p.extra_generation_params == {"Seed": 1}  # no GGUF LoRA: nothing recorded

    # the VAE's loader (refreshed last, no GGUF weights) must not erase the others' modes
    p.sd_model = _fake_model({"Q4_K": "runtime", "Q8_0": "merge"}, {"Q8_0": "runtime", "F16": "merge"}, {})
    script.postprocess_batch(p, images=None, batch_number=0)
    text = p.extra_generation_params["GGUF LoRA"]
    assert text == "F16:merge,Q4_K:runtime,Q8_0:merge+runtime"
    from gguf_tab.options import parse_lora_infotext

    assert parse_lora_infotext(text) == {"F16": "merge", "Q4_K": "runtime", "Q8_0": "merge+runtime"}


def test_runtime_factors_follow_the_layer_device():
    """One cached copy of the factors, for the device and dtype the layer runs with now
    (a layer Forge moves away must not keep a copy alive on the old device)."""
    import torch

    from lib_lora.apply import attach_runtime
    from lib_lora.loader import Patch

    lin = torch.nn.Linear(8, 6, bias=False)
    g = torch.Generator().manual_seed(0)
    patch = Patch("weight", "lora", {"up": torch.randn(6, 2, generator=g), "down": torch.randn(2, 8, generator=g)},
                  None, None, None, "k")
    hook = attach_runtime(lin, [(patch, 1.0)])
    x = torch.randn(3, 8, generator=g)
    ref = lin(x)
    lin(x.double().float().half().float())
    lin.half()
    out16 = lin(x.half())
    # one copy; on the CPU a half-precision layer's low-rank products run in float32
    assert len(hook._cache) == 1 and next(iter(hook._cache)) == (x.device, torch.float32)
    assert torch.allclose(out16.float(), ref, atol=2e-2)
    hook.remove()


@stand_in_only
def test_pasted_infotext_modes_win_over_the_options(monkeypatch):
    from lib_lora.policy import LoraOptions

    mod = _load("gguf_backend_paste", stand_in_forge=True, monkeypatch=monkeypatch)
    monkeypatch.setitem(extension._state, "options", lambda: LoraOptions(mode_by_format={"Q4_K": "merge"}))
    try:
        script = mod.GGUFLoraScript()
        script.process(types.SimpleNamespace(), "Q4_K:runtime,Q8_0:merge+runtime,bogus:fast")
        opts = extension._options()
        assert opts.mode_by_format == {"Q4_K": "runtime", "Q8_0": "merge"}
        script.process(types.SimpleNamespace(), "")  # nothing pasted: the tab's options again
        assert extension._options().mode_by_format == {"Q4_K": "merge"}
    finally:
        extension.set_mode_override(None)


@pytest.mark.ui
@stand_in_only
def test_the_paste_field_is_registered_for_the_infotext_key(monkeypatch):
    import gradio as gr
    mod = _load("gguf_backend_ui", stand_in_forge=True, monkeypatch=monkeypatch)
    script = mod.GGUFLoraScript()
    with gr.Blocks():
        comps = script.ui(False)
    assert len(comps) == 1 and isinstance(comps[0], gr.Textbox)
    assert script.infotext_fields == [(comps[0], "GGUF LoRA")]
