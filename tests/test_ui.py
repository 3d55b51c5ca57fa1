"""The GGUF tab (gguf_tab/, and scripts/gguf_ui.py, Forge's script for it): the Blocks
build, options saved and loaded (JSON standalone, Forge's opts inside Forge), the
inspector on real GGUF files written by gguf-py's own writer, and the errors shown in
the page. Inside Forge: Forge's own modules when a checkout is given (FORGE_DIR,
FORGE_PYTHON), else a stand-in for them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gguf_tab import app, bake, common, convert, inspector, options

ROOT = Path(__file__).resolve().parents[1]
FORGE_DIR = os.environ.get("FORGE_DIR")

import gradio as gr  # noqa: E402  (requirements-test.txt; CI runs this file on Forge's gradio too)

pytestmark = pytest.mark.ui


@pytest.fixture
def ui(tmp_path, monkeypatch):
    """The tab's modules, standalone, with their options in a file of this test's own."""
    monkeypatch.setattr(common, "_host", None)
    monkeypatch.setattr(common, "_loaded_model", None)
    monkeypatch.setattr(options, "_options_file", str(tmp_path / "options.json"))
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    return types.SimpleNamespace(app=app, bake=bake, common=common, convert=convert, inspector=inspector,
                                 options=options)


def run_forge_check(what: str) -> dict:
    """tests/forge_scripts_check.py in Forge's interpreter: what our scripts did there."""
    py = os.environ.get("FORGE_PYTHON", sys.executable)
    r = subprocess.run([py, str(ROOT / "tests" / "forge_scripts_check.py"), what], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, FORGE_DIR=FORGE_DIR, GRADIO_ANALYTICS_ENABLED="False"))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


# -- a real GGUF file, written by gguf-py (the reference writer) ------------------------

def write_reference_gguf(path: Path) -> dict:
    """A small Flux-named GGUF with F32, F16, Q8_0 (gguf-py's quantizer) and Q4_K /
    IQ4_XS tensors (random bytes of the right size: the inspector only reads headers).
    Returns {name: (format name, logical shape, nbytes)}."""
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "flux")
    expect = {}

    def add_raw(name, qt, shape):
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        byte_shape = (*shape[:-1], shape[-1] // bs * ts)
        data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
        if qt == T.Q8_0:
            data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qt)
        w.add_tensor(name, data, raw_dtype=qt)
        expect[name] = (qt.name, tuple(shape), int(np.prod(byte_shape)))

    w.add_tensor("img_in.weight", rng.standard_normal((256, 64)).astype(np.float16))
    expect["img_in.weight"] = ("F16", (256, 64), 256 * 64 * 2)
    w.add_tensor("img_in.bias", rng.standard_normal(256).astype(np.float32))
    expect["img_in.bias"] = ("F32", (256,), 256 * 4)
    add_raw("double_blocks.0.img_attn.qkv.weight", T.Q4_K, (768, 256))
    add_raw("double_blocks.0.img_attn.proj.weight", T.Q4_K, (256, 256))
    add_raw("double_blocks.0.img_mlp.0.weight", T.Q8_0, (1024, 256))
    add_raw("double_blocks.0.img_mlp.2.weight", T.Q8_0, (256, 1024))
    add_raw("single_blocks.0.linear1.weight", T.IQ4_XS, (1792, 256))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def reference_listing(path: Path) -> dict:
    """{name: (format, shape, nbytes)} from gguf-py's reader, the independent reference."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(list(t.shape)))  # gguf-py lists dims fastest first
        out[t.name] = (gguf.GGMLQuantizationType(int(t.tensor_type)).name, shape, int(t.n_bytes))
    return out


# -- import, build ----------------------------------------------------------------------

def test_import_does_nothing_heavy():
    """Forge runs scripts/gguf_ui.py at its start: outside Forge it registers nothing, and
    neither it nor the tab's modules import gradio, torch, lib_gguf or lib_lora."""
    code = ("import runpy, sys; g = runpy.run_path(sys.argv[1]); import gguf_tab.app, gguf_tab.options; "
            "print(sorted(k for k in ('gradio', 'torch', 'lib_gguf', 'lib_lora') if k in sys.modules), "
            "g['shared'], 'register_with_forge' in g)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "gguf_ui.py")], capture_output=True,
                         text=True, timeout=60, cwd=str(ROOT / "tests"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "None", "False"]


def _config_components(demo):
    cfg = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    return cfg["components"]


def test_blocks_build_has_every_format_and_preset(ui):
    from lib_gguf.formats import FORMATS
    from lib_gguf.recipes import PRESETS

    demo = ui.app.build_tab()
    assert isinstance(demo, gr.Blocks)
    comps = _config_components(demo)
    by_id = {c["props"].get("elem_id"): c for c in comps if c["props"].get("elem_id")}
    names = [n for _, ns in ui.options.lora_formats() for n in ns]
    # the formats people use all have their own LoRA mode
    for n in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_XXS", "F16", "BF16"]:
        assert n in names
        radio = by_id[f"gguf_mode_{n}"]
        assert radio["props"]["label"] == n
        values = [c[1] if isinstance(c, (list, tuple)) else c for c in radio["props"]["choices"]]
        assert values == ["default", "merge", "runtime", "auto"]
    # every name is a real table entry, and no integer types
    table = {f.name: f for f in FORMATS.values()}
    assert all(table[n].family != "int" for n in names)
    preset = by_id["gguf_convert_preset"]
    assert [c[1] if isinstance(c, (list, tuple)) else c for c in preset["props"]["choices"]] == list(PRESETS)
    for eid in ("gguf_inspect_btn", "gguf_inspect_summary", "gguf_opt_save", "gguf_convert_btn", "gguf_bake_btn",
                "gguf_keep_threshold", "gguf_compute_dtype"):
        assert eid in by_id


def test_requantize_targets_follow_the_table(ui):
    from lib_gguf.formats import get_format

    assert {"IQ2_XXS", "IQ2_XS", "IQ1_S"} <= set(ui.options.requantize_formats())
    assert not {"Q4_K", "IQ4_XS", "F16"} & set(ui.options.requantize_formats())
    for n in ui.options.requantize_formats():
        f = get_format(n)
        assert f.is_quantized and (not f.can_quantize or f.needs_imatrix)
    for n in ui.options.target_formats():
        assert get_format(n).can_quantize


# -- options -----------------------------------------------------------------------------

def test_options_round_trip_json(ui, tmp_path):
    from lib_lora.policy import LoraOptions

    o = ui.options
    assert o.load_options() == o.default_options() == LoraOptions().to_dict()
    want = {
        "mode_by_format": {"Q4_K": "runtime", "q8_0": "merge", "IQ4_XS": "auto", "Q5_0": "default"},
        "default_mode": "merge", "default_gguf_mode": "auto",
        "requantize_target": {"IQ2_XXS": "Q4_K", "IQ1_S": "default"},
        "fallback_format": "Q6_K", "compute_dtype": "bfloat16", "keep_threshold": 0.75,
    }
    msg = o.save_options(want)
    assert "Saved" in msg and str(tmp_path / "options.json") in msg
    got = o.load_options()
    assert got["mode_by_format"] == {"Q4_K": "runtime", "Q8_0": "merge", "IQ4_XS": "auto"}
    assert got["requantize_target"] == {"IQ2_XXS": "Q4_K"}
    assert (got["default_mode"], got["default_gguf_mode"], got["fallback_format"]) == ("merge", "auto", "Q6_K")
    assert got["compute_dtype"] == "bfloat16" and got["keep_threshold"] == pytest.approx(0.75)
    assert json.loads((tmp_path / "options.json").read_text()) == got
    # another process reads the same file
    code = ("import sys; from gguf_tab import options; options.set_options_file(sys.argv[1]); "
            "import json; print(json.dumps(options.load_options()))")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "options.json")], capture_output=True,
                           text=True, timeout=60, cwd=str(ROOT))
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout) == got
    # per-format resolution
    assert o.mode_for("Q4_K") == "runtime"
    assert o.mode_for("Q6_K") == "auto"  # quantized, no entry: default_gguf_mode
    assert o.mode_for("F16") == "merge"  # float: default_mode


def test_options_are_the_policys_lora_options(ui):
    from lib_lora.policy import MODES, LoraOptions

    ui.options.save_options({"mode_by_format": {"Q4_K": "merge"}, "keep_threshold": 0.5})
    o = ui.options.current_options()
    assert isinstance(o, LoraOptions)
    assert o.mode_by_format == {"Q4_K": "merge"} and o.keep_threshold == pytest.approx(0.5)
    assert LoraOptions.from_dict(o.to_dict()).to_dict() == o.to_dict()
    # the tab's radios show the policy's modes, in its order
    assert [m for _label, m in ui.options.mode_choices()] == list(MODES)
    assert [m for _label, m in ui.options.mode_choices(True)] == ["default", *MODES]


def test_bad_options_are_refused_and_a_bad_file_gives_defaults(ui, tmp_path, caplog):
    msg = ui.options.save_options({"mode_by_format": {"Q4_K": "sometimes"}})
    assert msg.startswith("**Error:**") and "Q4_K" in msg and "sometimes" in msg
    assert not (tmp_path / "options.json").exists()
    assert "keep_threshold" in ui.options.save_options({"keep_threshold": 3})
    (tmp_path / "options.json").write_text("{not json")
    assert ui.options.load_options() == ui.options.default_options()


def test_infotext_round_trip(ui):
    o = ui.options
    o.save_options({"mode_by_format": {"Q4_K": "runtime", "Q8_0": "merge"}, "default_mode": "merge"})
    info = o.lora_infotext(formats=["Q8_0", "Q4_K", "F16"])
    assert info == {"GGUF LoRA": "F16:merge,Q4_K:runtime,Q8_0:merge"}
    assert o.parse_lora_infotext(info["GGUF LoRA"]) == {"F16": "merge", "Q4_K": "runtime", "Q8_0": "merge"}
    assert o.lora_infotext(modes={"Q6_K": "auto"}) == {"GGUF LoRA": "Q6_K:auto"}
    assert o.lora_infotext(formats=[]) == {}


# -- inside Forge ---------------------------------------------------------------------------

@pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR (and FORGE_PYTHON) to a Forge checkout")
def test_in_forge_its_own_settings_store_the_options_and_the_tab_registers_once():
    """scripts/gguf_ui.py loaded twice by Forge's script loader, with Forge's own
    ``shared.opts`` (``Options``, ``OptionInfo``) and ``script_callbacks``."""
    r = run_forge_check("ui")
    assert r["tab_callbacks"] == 1 and r["settings_callbacks"] == 1, r
    assert {"gguf_lora_mode_Q4_K", "gguf_lora_mode_IQ4_XS", "gguf_lora_mode_F16", "gguf_lora_keep_threshold",
            "gguf_lora_compute_dtype", "gguf_lora_default_gguf_mode", "gguf_lora_requant_IQ2_XXS"} <= set(r["keys"])
    assert r["sections"] == [["gguf_lora", "GGUF LoRA"]]
    assert r["read"] == [{"Q4_K": "merge"}, 0.5]  # what the settings page stores is what the tab reads
    assert "Forge's settings" in r["saved_msg"]
    assert r["config"] == {"gguf_lora_mode_Q6_K": "runtime", "gguf_lora_mode_Q4_K": "default",
                           "gguf_lora_compute_dtype": "float16"}  # in Forge's config file
    assert r["after_save"] == {"Q6_K": "runtime"}
    assert r["tab"] == [True, "GGUF", "forge_gguf_lora"]


class _StandInOpts:
    """A stand-in for Forge's ``shared.opts`` (the no-Forge run only)."""

    def __init__(self):
        self.data, self.data_labels, self.saved = {}, {}, []

    def add_option(self, key, info):  # as Forge's Options.add_option
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value):  # as Forge's Options.set: only registered keys
        self.data_labels[key]
        self.data[key] = value
        return True

    def save(self, filename):
        self.saved.append(filename)


class _StandInOptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
        self.default, self.label, self.component, self.component_args, self.section = (
            default, label, component, component_args, section)


@pytest.fixture
def stand_in_forge(monkeypatch, tmp_path):
    """Stand-ins for Forge's ``modules.shared`` and ``modules.script_callbacks``, for the
    run without a Forge checkout (with one, the test above runs Forge's own)."""
    if FORGE_DIR:
        pytest.skip("FORGE_DIR is set: Forge's own modules are tested instead")
    modules = types.ModuleType("modules")
    shared = types.ModuleType("modules.shared")
    cb = types.ModuleType("modules.script_callbacks")
    shared.opts, shared.OptionInfo = _StandInOpts(), _StandInOptionInfo
    shared.config_filename = str(tmp_path / "config.json")
    cb.callback_map = {"callbacks_ui_tabs": [], "callbacks_ui_settings": []}

    def add(kind):
        def register(fn, *, name=None):
            cb.callback_map[kind].append(types.SimpleNamespace(callback=fn, name=f"ext/app.py/x/{name}"))
        return register

    cb.on_ui_tabs, cb.on_ui_settings = add("callbacks_ui_tabs"), add("callbacks_ui_settings")
    modules.shared, modules.script_callbacks = shared, cb
    for k, v in (("modules", modules), ("modules.shared", shared), ("modules.script_callbacks", cb)):
        monkeypatch.setitem(sys.modules, k, v)
    monkeypatch.setattr(common, "_host", None)
    return shared, cb


def test_forge_registration_settings_and_options_with_stand_ins(stand_in_forge):
    import runpy

    shared, cb = stand_in_forge
    for _ in range(2):  # Forge runs the script; a second run must not register twice
        runpy.run_path(str(ROOT / "scripts" / "gguf_ui.py"))
    assert common.host() is shared
    assert len(cb.callback_map["callbacks_ui_tabs"]) == 1
    assert len(cb.callback_map["callbacks_ui_settings"]) == 1
    cb.callback_map["callbacks_ui_settings"][0].callback()
    labels = shared.opts.data_labels
    assert {"gguf_lora_mode_Q4_K", "gguf_lora_mode_IQ4_XS", "gguf_lora_mode_F16", "gguf_lora_keep_threshold",
            "gguf_lora_compute_dtype", "gguf_lora_default_gguf_mode"} <= set(labels)
    assert all(info.section == ("gguf_lora", "GGUF LoRA") for info in labels.values())
    shared.opts.data["gguf_lora_mode_Q4_K"] = "merge"
    shared.opts.data["gguf_lora_keep_threshold"] = 0.5
    got = options.load_options()
    assert got["mode_by_format"] == {"Q4_K": "merge"} and got["keep_threshold"] == 0.5
    msg = options.save_options({"mode_by_format": {"Q6_K": "runtime"}, "compute_dtype": "float16"})
    assert "Forge's settings" in msg and shared.opts.saved == [shared.config_filename]
    assert shared.opts.data["gguf_lora_mode_Q6_K"] == "runtime" and shared.opts.data["gguf_lora_mode_Q4_K"] == "default"
    assert options.load_options()["mode_by_format"] == {"Q6_K": "runtime"}
    (blocks, title, elem_id), = cb.callback_map["callbacks_ui_tabs"][0].callback()
    assert isinstance(blocks, gr.Blocks) and title == "GGUF"


# -- the inspector --------------------------------------------------------------------------

def test_inspector_matches_gguf_py(ui, tmp_path):
    path = tmp_path / "model.gguf"
    expect = write_reference_gguf(path)
    ref = reference_listing(path)
    assert {k: (f, s) for k, (f, s, _) in ref.items()} == {k: (f, s) for k, (f, s, _) in expect.items()}
    ui.options.save_options({"mode_by_format": {"Q4_K": "merge"}, "default_mode": "runtime"})
    r = ui.inspector.inspect_file(str(path))
    assert r["ok"], r["summary"]
    assert f"{len(ref)} tensors" in r["summary"]
    rows = {row[0]: row for row in r["rows"]}
    assert set(rows) == set(ref)
    for name, (fmt, shape, nbytes) in ref.items():
        assert rows[name][1] == fmt
        assert rows[name][2] == " × ".join(map(str, shape))
        n = int(np.prod(shape))
        assert rows[name][3] == pytest.approx(nbytes * 8 / n, abs=1e-3)
    # the histogram: one line per format, with the reference counts and bits per weight
    counts = {}
    for fmt, shape, nbytes in ref.values():
        c = counts.setdefault(fmt, [0, 0, 0])
        c[0] += 1
        c[1] += int(np.prod(shape))
        c[2] += nbytes
    hist_lines = {line.split("|")[1].strip(): line for line in r["histogram"].splitlines()[2:]}
    assert set(hist_lines) == set(counts)
    for fmt, (count, n, nb) in counts.items():
        cells = [c.strip() for c in hist_lines[fmt].split("|")[1:-1]]
        assert cells[1] == str(count) and cells[2] == str(n)
        assert float(cells[4]) == pytest.approx(nb * 8 / n, abs=1e-3)
        assert cells[6] == ui.options.mode_for(fmt)  # the LoRA mode the options give this format
    assert "| merge |" in hist_lines["Q4_K"] and "| runtime |" in hist_lines["F16"]
    assert "Q8_0" in r["summary"] and "Q4_K ×2" in r["summary"]
    assert float(hist_lines["Q8_0"].split("|")[5]) == pytest.approx(8.5)
    assert float(hist_lines["IQ4_XS"].split("|")[5]) == pytest.approx(4.25)


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "folder", "empty"])
def test_inspector_errors_are_shown_not_raised(ui, tmp_path, case):
    if case == "missing":
        path, want = tmp_path / "nope.gguf", "not found"
    elif case == "text":
        path, want = tmp_path / "bad.gguf", "Error"
        path.write_text("this is not a GGUF file\n" * 10)
    elif case == "truncated":
        good = tmp_path / "good.gguf"
        write_reference_gguf(good)
        path, want = tmp_path / "cut.gguf", "Error"
        path.write_bytes(good.read_bytes()[:200])
    elif case == "folder":
        path, want = tmp_path, "folder"
    else:
        path, want = "", "no GGUF file given"
    r = ui.inspector.inspect_file(str(path))
    assert not r["ok"]
    assert want in r["summary"]
    assert "Traceback" not in r["summary"] and "Unexpected" not in r["summary"]


def test_convert_and_bake_errors_in_the_page(ui, tmp_path):
    out = ui.convert.convert_file(str(tmp_path / "missing.safetensors"), "", "Q8_0")
    assert "not found" in out and "missing.safetensors" in out
    src = tmp_path / "model.txt"
    src.write_text("x")
    assert "expected a .safetensors or .gguf file" in ui.convert.convert_file(str(src), "", "Q8_0")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = ui.convert.convert_file(str(bad), str(tmp_path / "o.gguf"), "Q8_0")
    assert out.startswith("**Error:**") and "Traceback" not in out, out
    assert "bad.safetensors" in out and "safetensors" in out
    assert not (tmp_path / "o.gguf").exists()
    assert "rules line 1" in ui.convert.convert_file(str(bad), "", "Q8_0", rules="no equals sign")
    assert "expected a .gguf file" in ui.convert.convert_file(str(bad), str(tmp_path / "o.bin"), "Q8_0")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert "no LoRA given" in ui.bake.bake_file(str(model), "", "")
    out = ui.bake.bake_file(str(model), "x.safetensors:0.5", "")
    assert "LoRA file not found" in out and "x.safetensors" in out
    assert "would overwrite" in ui.bake.bake_file(str(model), str(bad), str(model))
    assert "bad.safetensors: expected a .gguf file" in ui.bake.bake_file(str(bad), str(bad), "")


def test_convert_then_inspect(ui, tmp_path):
    """The converter through the page, then the inspector on its output, against gguf-py."""
    import torch
    from safetensors.torch import save_file

    from lib_gguf.sample import tiny_flux_state_dict

    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(dtype=torch.float16), str(src))
    calls = []
    out = ui.convert.convert_file(str(src), "", "Q8_0", progress=lambda p, desc=None: calls.append(p))
    assert out.startswith("**Done.**"), out
    dst = tmp_path / "flux-Q8_0.gguf"
    assert dst.exists()
    assert calls and calls[-1][0] == calls[-1][1]  # the bar reaches its end
    ref = reference_listing(dst)
    r = ui.inspector.inspect_file(str(dst))
    assert r["ok"] and {row[0]: row[1] for row in r["rows"]} == {k: v[0] for k, v in ref.items()}


def test_the_inspector_says_which_layers_a_lora_would_merge_or_run(ui, tmp_path):
    """The inspector's LoRA input: a kohya LoRA placed on the file's own layers, each
    with its format and the mode the options give it; keys it cannot place are named."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ref.gguf"
    write_reference_gguf(path)
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(768, 4, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 256, generator=g),
               "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.randn(1024, 4, generator=g),
               "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.randn(4, 256, generator=g),
               "lora_unet_double_blocks_7_img_mlp_0.lora_up.weight": torch.randn(1024, 4, generator=g),
               "lora_unet_double_blocks_7_img_mlp_0.lora_down.weight": torch.randn(4, 256, generator=g)},
              str(lora))
    r = ui.inspector.inspect_file(str(path), str(lora), opts={"mode_by_format": {"Q8_0": "merge"}})
    plan = r["lora"]
    assert plan.startswith("**LoRA style.safetensors**: 2 layers"), plan
    assert "| `double_blocks.0.img_attn.qkv.weight` | Q4_K | [768, 256] | runtime |" in plan
    assert "| `double_blocks.0.img_mlp.0.weight` | Q8_0 | [1024, 256] | merge |" in plan
    assert "lora_unet_double_blocks_7_img_mlp_0" in plan  # not in this model: named, not dropped
