"""Our two Forge scripts loaded by Forge's own script loader, against Forge's real
``modules.shared`` (its ``Options``, ``OptionInfo``), ``modules.script_callbacks`` and
``modules.scripts.Script``. Run in an interpreter that imports Forge (``FORGE_PYTHON``)
with ``FORGE_DIR`` set, by tests/test_ui.py (``ui``) and tests/test_backend_script.py
(``backend``); prints one JSON object of what it saw, the tests assert on it.
"""
import json
import os
import sys
import tempfile
import types

FORGE = os.environ["FORGE_DIR"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHAT = sys.argv[1]
sys.argv = [sys.argv[0], "--always-cpu"]  # Forge parses its arguments on import
sys.path.insert(0, FORGE)
sys.path.insert(1, os.path.join(FORGE, "repositories", "huggingface_guess"))
sys.path.append(os.path.join(FORGE, "packages_3rdparty"))
sys.path.insert(0, ROOT)
os.chdir(FORGE)

from modules import options, script_callbacks, script_loading, scripts, shared, shared_options  # noqa: E402

tmp = tempfile.mkdtemp(prefix="forge-scripts-check-")
shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
shared.config_filename = os.path.join(tmp, "config.json")
out = {}


def ui_check():
    import gradio as gr

    from gguf_tab import options as tab_options

    for _ in range(2):  # a second load (a reload, another copy) must not register twice
        script_loading.load_module(os.path.join(ROOT, "scripts", "gguf_ui.py"))
    cmap = script_callbacks.callback_map
    ours = lambda kind: [c for c in cmap[kind] if "forge_gguf_lora" in c.name]  # noqa: E731
    out["tab_callbacks"] = len(ours("callbacks_ui_tabs"))
    out["settings_callbacks"] = len(ours("callbacks_ui_settings"))
    ours("callbacks_ui_settings")[0].callback()  # what Forge does when it builds the settings page
    labels = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("gguf_lora_")}
    out["keys"] = sorted(labels)
    out["sections"] = sorted({tuple(v.section) for v in labels.values()})
    shared.opts.data["gguf_lora_mode_Q4_K"] = "merge"
    shared.opts.data["gguf_lora_keep_threshold"] = 0.5
    got = tab_options.load_options()
    out["read"] = [got["mode_by_format"], got["keep_threshold"]]
    out["saved_msg"] = tab_options.save_options({"mode_by_format": {"Q6_K": "runtime"}, "compute_dtype": "float16"})
    with open(shared.config_filename, encoding="utf-8") as fh:
        saved = json.load(fh)
    out["config"] = {k: saved[k] for k in ("gguf_lora_mode_Q6_K", "gguf_lora_mode_Q4_K", "gguf_lora_compute_dtype")}
    out["after_save"] = tab_options.load_options()["mode_by_format"]
    (blocks, title, elem_id), = ours("callbacks_ui_tabs")[0].callback()
    out["tab"] = [isinstance(blocks, gr.Blocks), title, elem_id]


def backend_check():
    import gradio as gr

    import extension

    mod = script_loading.load_module(os.path.join(ROOT, "scripts", "gguf_backend.py"))
    out["registered"] = extension.is_registered()
    script = mod.GGUFLoraScript()
    out["is_forge_script"] = isinstance(script, scripts.Script)
    out["always_visible"] = script.show(False) is scripts.AlwaysVisible
    with gr.Blocks():
        comps = script.ui(False)
    out["ui"] = [type(c).__name__ for c in comps] + [key for _c, key in script.infotext_fields]
    script.process(types.SimpleNamespace(), "Q4_K:runtime,Q8_0:merge+runtime")
    out["pasted"] = extension._options().mode_by_format
    script.process(types.SimpleNamespace(), "")
    out["cleared"] = extension._options().mode_by_format
    # the parts of a model (Forge's processing object's sd_model), each loader with its last refresh's modes
    part = lambda modes: types.SimpleNamespace(patcher=types.SimpleNamespace(  # noqa: E731
        lora_loader=types.SimpleNamespace(_gguf_modes=modes)))
    model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(
        unet=types.SimpleNamespace(lora_loader=types.SimpleNamespace(_gguf_modes={"Q4_K": "runtime", "Q8_0": "merge"})),
        clip=part({"Q8_0": "runtime", "F16": "merge"}), vae=part({})))
    p = types.SimpleNamespace(extra_generation_params={}, sd_model=model)
    script.postprocess_batch(p)
    out["infotext"] = p.extra_generation_params
    extension.unregister()


{"ui": ui_check, "backend": backend_check}[WHAT]()
print("RESULT " + json.dumps(out), flush=True)
