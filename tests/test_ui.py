"""The GGUF tab (scripts/gguf_ui.py): the Blocks build, options saved and loaded
(JSON standalone, Forge's opts inside Forge), the inspector on real GGUF files
written by gguf-py's own writer, and the errors shown in the page."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_PATH = ROOT / "scripts" / "gguf_ui.py"

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install gradio)")


def load_ui(name: str = "gguf_ui_under_test"):
    """Load scripts/gguf_ui.py by path, as Forge does (gguf 0.10 from PyPI installs a
    top-level ``scripts`` package that would shadow ours)."""
    spec = importlib.util.spec_from_file_location(name, UI_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ui(tmp_path, monkeypatch):
    mod = load_ui()
    state = mod._STATE
    monkeypatch.setattr(state, "forge", None, raising=False)
    monkeypatch.setattr(state, "options_file", str(tmp_path / "options.json"))
    monkeypatch.setattr(state, "loaded_model", None)
    monkeypatch.setenv(mod.CACHE_ENV, str(tmp_path / "cache"))
    return mod


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


def need_reader():
    try:
        import lib_gguf.reader  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("lib_gguf.reader has not landed yet")


# -- import, build ----------------------------------------------------------------------

def test_import_does_nothing_heavy():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('g', {str(UI_PATH)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(k for k in ('gradio', 'torch', 'lib_gguf', 'lib_lora') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _config_components(demo):
    cfg = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    return cfg["components"]


def test_blocks_build_has_every_format_and_preset(ui):
    from lib_gguf.formats import FORMATS
    from lib_gguf.recipes import PRESETS

    demo = ui.build_tab()
    assert isinstance(demo, gr.Blocks)
    comps = _config_components(demo)
    by_id = {c["props"].get("elem_id"): c for c in comps if c["props"].get("elem_id")}
    names = [n for _, ns in ui.lora_formats() for n in ns]
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

    for n in ui.requantize_formats():
        f = get_format(n)
        assert f.is_quantized and (not f.can_quantize or f.needs_imatrix)
    for n in ui.target_formats():
        assert get_format(n).can_quantize


# -- options -----------------------------------------------------------------------------

def test_options_round_trip_json(ui, tmp_path):
    assert ui.current_options_dict() == ui.DEFAULT_OPTIONS
    want = {
        "mode_by_format": {"Q4_K": "runtime", "q8_0": "merge", "IQ4_XS": "auto", "Q5_0": "default"},
        "default_mode": "merge", "default_gguf_mode": "auto",
        "requantize_target": {"IQ2_XXS": "Q4_K", "IQ1_S": "default"},
        "fallback_format": "Q6_K", "compute_dtype": "bfloat16", "keep_threshold": 0.75,
    }
    msg = ui.save_options(want)
    assert "Saved" in msg and str(tmp_path / "options.json") in msg
    got = ui.current_options_dict()
    assert got["mode_by_format"] == {"Q4_K": "runtime", "Q8_0": "merge", "IQ4_XS": "auto"}
    assert got["requantize_target"] == {"IQ2_XXS": "Q4_K"}
    assert (got["default_mode"], got["default_gguf_mode"], got["fallback_format"]) == ("merge", "auto", "Q6_K")
    assert got["compute_dtype"] == "bfloat16" and got["keep_threshold"] == pytest.approx(0.75)
    assert json.loads((tmp_path / "options.json").read_text()) == got
    # a fresh copy of the module (another process) reads the same file
    other = load_ui("gguf_ui_other_copy")
    assert other.current_options_dict() == got
    # per-format resolution
    assert ui.mode_for("Q4_K") == "runtime"
    assert ui.mode_for("Q6_K") == "auto"  # quantized, no entry: default_gguf_mode
    assert ui.mode_for("F16") == "merge"  # float: default_mode


def test_options_are_lora_options_when_lib_lora_has_them(ui):
    try:
        from lib_lora.policy import LoraOptions
    except ModuleNotFoundError:
        with pytest.raises(ui.UIError, match="not available yet"):
            ui.current_options()
        return
    ui.save_options({"mode_by_format": {"Q4_K": "merge"}, "keep_threshold": 0.5})
    o = ui.current_options()
    assert isinstance(o, LoraOptions)
    assert o.mode_by_format == {"Q4_K": "merge"} and o.keep_threshold == pytest.approx(0.5)
    assert LoraOptions.from_dict(o.to_dict()).to_dict() == o.to_dict()


def test_bad_options_are_refused_and_a_bad_file_gives_defaults(ui, tmp_path, caplog):
    msg = ui.save_options({"mode_by_format": {"Q4_K": "sometimes"}})
    assert msg.startswith("**Error:**") and "Q4_K" in msg and "sometimes" in msg
    assert not (tmp_path / "options.json").exists()
    assert "keep_threshold" in ui.save_options({"keep_threshold": 3})
    (tmp_path / "options.json").write_text("{not json")
    assert ui.current_options_dict() == ui.DEFAULT_OPTIONS


def test_infotext_round_trip(ui):
    ui.save_options({"mode_by_format": {"Q4_K": "runtime", "Q8_0": "merge"}, "default_mode": "merge"})
    info = ui.lora_infotext(formats=["Q8_0", "Q4_K", "F16"])
    assert info == {"GGUF LoRA": "F16:merge,Q4_K:runtime,Q8_0:merge"}
    assert ui.parse_lora_infotext(info["GGUF LoRA"]) == {"F16": "merge", "Q4_K": "runtime", "Q8_0": "merge"}
    assert ui.lora_infotext(modes={"Q6_K": "auto"}) == {"GGUF LoRA": "Q6_K:auto"}
    assert ui.lora_infotext(formats=[]) == {}


# -- inside Forge: a stand-in for Forge's modules.shared / script_callbacks ----------------

class _FakeOpts:
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


class _FakeOptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, section=None, **kw):
        self.default, self.label, self.component, self.component_args, self.section = (
            default, label, component, component_args, section)


@pytest.fixture
def fake_forge(monkeypatch, tmp_path):
    modules = types.ModuleType("modules")
    shared = types.ModuleType("modules.shared")
    cb = types.ModuleType("modules.script_callbacks")
    shared.opts, shared.OptionInfo, shared.config_filename = _FakeOpts(), _FakeOptionInfo, str(tmp_path / "config.json")
    cb.callback_map = {"callbacks_ui_tabs": [], "callbacks_ui_settings": []}

    def add(kind):
        def register(fn, *, name=None):
            cb.callback_map[kind].append(types.SimpleNamespace(callback=fn, name=f"ext/gguf_ui.py/x/{name}"))
        return register

    cb.on_ui_tabs, cb.on_ui_settings = add("callbacks_ui_tabs"), add("callbacks_ui_settings")
    modules.shared, modules.script_callbacks = shared, cb
    for k, v in (("modules", modules), ("modules.shared", shared), ("modules.script_callbacks", cb)):
        monkeypatch.setitem(sys.modules, k, v)
    return shared, cb


def test_forge_registration_settings_and_options(fake_forge, monkeypatch):
    shared, cb = fake_forge
    first = load_ui("gguf_ui_forge_a")
    monkeypatch.setattr(first._STATE, "forge", None)  # forget any earlier detection
    first._register_with_forge()
    load_ui("gguf_ui_forge_b")  # extension.py importing it again must not register twice
    assert len(cb.callback_map["callbacks_ui_tabs"]) == 1
    assert len(cb.callback_map["callbacks_ui_settings"]) == 1
    cb.callback_map["callbacks_ui_settings"][0].callback()
    labels = shared.opts.data_labels
    assert {"gguf_lora_mode_Q4_K", "gguf_lora_mode_IQ4_XS", "gguf_lora_mode_F16", "gguf_lora_keep_threshold",
            "gguf_lora_compute_dtype", "gguf_lora_default_gguf_mode"} <= set(labels)
    assert all(info.section == ("gguf_lora", "GGUF LoRA") for info in labels.values())
    # the settings page and the tab agree: what the page stores is what current_options sees
    shared.opts.data["gguf_lora_mode_Q4_K"] = "merge"
    shared.opts.data["gguf_lora_keep_threshold"] = 0.5
    got = first.current_options_dict()
    assert got["mode_by_format"] == {"Q4_K": "merge"} and got["keep_threshold"] == 0.5
    msg = first.save_options({"mode_by_format": {"Q6_K": "runtime"}, "compute_dtype": "float16"})
    assert "Forge's settings" in msg and shared.opts.saved == [shared.config_filename]
    assert shared.opts.data["gguf_lora_mode_Q6_K"] == "runtime" and shared.opts.data["gguf_lora_mode_Q4_K"] == "default"
    assert first.current_options_dict()["mode_by_format"] == {"Q6_K": "runtime"}
    tabs = cb.callback_map["callbacks_ui_tabs"][0].callback()
    (blocks, title, elem_id), = tabs
    assert isinstance(blocks, gr.Blocks) and title == "GGUF"


# -- the inspector --------------------------------------------------------------------------

def test_inspector_matches_gguf_py(ui, tmp_path):
    need_reader()
    path = tmp_path / "model.gguf"
    expect = write_reference_gguf(path)
    ref = reference_listing(path)
    assert {k: (f, s) for k, (f, s, _) in ref.items()} == {k: (f, s) for k, (f, s, _) in expect.items()}
    ui.save_options({"mode_by_format": {"Q4_K": "merge"}, "default_mode": "runtime"})
    r = ui.inspect_file(str(path))
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
        assert cells[6] == ui.mode_for(fmt)  # the LoRA mode the options give this format
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
        need_reader()
        good = tmp_path / "good.gguf"
        write_reference_gguf(good)
        path, want = tmp_path / "cut.gguf", "Error"
        path.write_bytes(good.read_bytes()[:200])
    elif case == "folder":
        path, want = tmp_path, "folder"
    else:
        path, want = "", "no GGUF file given"
    r = ui.inspect_file(str(path))
    assert not r["ok"]
    assert want in r["summary"]
    assert "Traceback" not in r["summary"] and "Unexpected" not in r["summary"]


def test_convert_and_bake_errors_in_the_page(ui, tmp_path):
    out = ui.convert_file(str(tmp_path / "missing.safetensors"), "", "Q8_0")
    assert "not found" in out and "missing.safetensors" in out
    src = tmp_path / "model.txt"
    src.write_text("x")
    assert "expected a .safetensors or .gguf file" in ui.convert_file(str(src), "", "Q8_0")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = ui.convert_file(str(bad), str(tmp_path / "o.gguf"), "Q8_0")
    assert out.startswith("**Error:**") and "Traceback" not in out, out
    if importlib.util.find_spec("lib_gguf.writer") is not None:
        assert "bad.safetensors" in out and "safetensors" in out
    else:
        assert "not available yet" in out
    assert not (tmp_path / "o.gguf").exists()
    assert "rules line 1" in ui.convert_file(str(bad), "", "Q8_0", rules="no equals sign")
    assert "expected a .gguf file" in ui.convert_file(str(bad), str(tmp_path / "o.bin"), "Q8_0")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert "no LoRA given" in ui.bake_file(str(model), "", "")
    out = ui.bake_file(str(model), "x.safetensors:0.5", "")
    assert "LoRA file not found" in out and "x.safetensors" in out
    assert "would overwrite" in ui.bake_file(str(model), str(bad), str(model))
    assert "bad.safetensors: expected a .gguf file" in ui.bake_file(str(bad), str(bad), "")


def test_convert_then_inspect(ui, tmp_path):
    """The converter through the page, then the inspector on its output, against gguf-py."""
    need_reader()
    pytest.importorskip("lib_gguf.writer", reason="lib_gguf.writer has not landed yet")
    import torch
    from safetensors.torch import save_file

    from lib_gguf.sample import tiny_flux_state_dict

    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(dtype=torch.float16), str(src))
    calls = []
    out = ui.convert_file(str(src), "", "Q8_0", progress=lambda p, desc=None: calls.append(p))
    assert out.startswith("**Done.**"), out
    dst = tmp_path / "flux-Q8_0.gguf"
    assert dst.exists()
    assert calls and calls[-1][0] == calls[-1][1]  # the bar reaches its end
    ref = reference_listing(dst)
    r = ui.inspect_file(str(dst))
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
    r = ui.inspect_file(str(path), str(lora), options={"mode_by_format": {"Q8_0": "merge"}})
    plan = r["lora"]
    assert plan.startswith("**LoRA style.safetensors**: 2 layers"), plan
    assert "| `double_blocks.0.img_attn.qkv.weight` | Q4_K | [768, 256] | runtime |" in plan
    assert "| `double_blocks.0.img_mlp.0.weight` | Q8_0 | [1024, 256] | merge |" in plan
    assert "lora_unet_double_blocks_7_img_mlp_0" in plan  # not in this model: named, not dropped
