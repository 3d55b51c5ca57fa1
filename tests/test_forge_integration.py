"""Our backend inside Forge's real backend code (needs a Forge checkout in $FORGE_DIR).

Runs tests/forge/run_forge_check.py in $FORGE_PYTHON (an interpreter where Forge's
backend imports: numpy < 2, einops, psutil, pillow, pyyaml, safetensors,
sentencepiece), once with whatever ``import gguf`` finds and once with Forge's
bundled copy first on the path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORGE_DIR = os.environ.get("FORGE_DIR")
FORMATS = ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S",
           "Q2_K", "Q3_K", "IQ3_XXS", "IQ2_S", "IQ1_M", "TQ1_0", "TQ2_0",
           "IQ2_XXS"]  # IQ2_XXS: no quantizer without an importance matrix; random valid bytes

pytestmark = [pytest.mark.forge,
              pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR to a Forge checkout to run against Forge")]


def _run(tmp_path, which_gguf):
    import lib_gguf

    formats = [f for f in FORMATS if lib_gguf.get_format(f).can_quantize or lib_gguf.get_format(f).needs_imatrix]
    if which_gguf == "newest" and not os.environ.get("FORGE_GGUF_NEWEST"):
        pytest.skip("set FORGE_GGUF_NEWEST to a folder holding the newest PyPI gguf (pip install --target DIR gguf)")
    env = dict(os.environ, FORGE_GGUF=which_gguf)
    py = os.environ.get("FORGE_PYTHON", sys.executable)
    r = subprocess.run([py, str(ROOT / "tests" / "forge" / "run_forge_check.py"), str(tmp_path), *formats],
                       capture_output=True, text=True, env=env, timeout=900)
    if "No module named" in r.stderr and not r.stdout.strip():  # FORGE_DIR is set: run it, or fail saying why
        pytest.fail(f"Forge's backend does not import in {py} (set FORGE_PYTHON to Forge's interpreter): "
                    f"{r.stderr.strip().splitlines()[-1]}")
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert lines, r.stderr[-3000:]
    art = ROOT / "artifacts"
    art.mkdir(exist_ok=True)
    (art / f"forge_check_{which_gguf}.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    return formats, lines


# first-found: whatever ``import gguf`` finds in $FORGE_PYTHON (CI's old PyPI gguf 0.10);
# bundled: no PyPI gguf in the way, Forge's own copy; newest: the newest PyPI gguf wins.
@pytest.mark.parametrize("which_gguf", ["first-found", "bundled", "newest"])
def test_every_format_loads_runs_and_takes_loras_in_forge(tmp_path, which_gguf):
    import lib_gguf

    formats, lines = _run(tmp_path, which_gguf)
    by_fmt = {l["format"]: l for l in lines if "format" in l}
    assert set(by_fmt) == set(formats)
    for fmt, res in by_fmt.items():
        assert res["ok"], (fmt, res.get("error"), res.get("trace"))
        assert res["runs"] and res["bytes_restored"] and res["hooks_after_remove"] == 0, (fmt, res)
        assert res["lora_changes_output"] > 0
        # the LoRA's change of the output, against Forge's float merge on the same network (this
        # format's weights dequantized; the network itself matches: same_network_base_err): at run
        # time it is that change up to float rounding (measured: err <= 0.001 for every format); merged,
        # its full size (keep 0.95-1.05 measured) under the requantization noise (err up to 0.63 at
        # 4 bits, measured). A dropped LoRA keeps 0 (err 1), a halved one 0.5.
        assert res["same_network_base_err"] < 0.05, (fmt, res)
        assert abs(res["runtime_effect_keep"] - 1) < 0.01 and res["runtime_effect_err"] < 0.01, (fmt, res)
        assert abs(res["merged_effect_keep"] - 1) < 0.1 and res["merged_effect_err"] < 0.8, (fmt, res)
        if res["merged_modes"].get(fmt) == "runtime":
            assert res["merged_effect_err"] < 0.01, (fmt, res)
        # Forge's loader counts every file GGUF (F16 included) and keeps the file's weights
        assert res["storage_dtype"] == "gguf", res
        if fmt == "F16":
            assert res["weight_dtype"] == "torch.float16", res
            assert res["policy_runtime_hooks"] == 1 and res["policy_runtime_modes"] == {"F16": "runtime"}, res
            assert res["policy_merge_hooks"] == 0 and res["policy_merge_modes"] == {"F16": "merge"}, res
            assert res["policy_merge_changes_output"] > 0, res
        if fmt != "F16":
            assert res["param_type"] == "GGUFParameter"
            # run time: a low-rank delta on the GGUF layer, no per-step re-merge by Forge
            assert res["online_hooks"] == 1 and not res["online_still_forge_online"], (fmt, res)
            # against the float model: no further off than the format is without a LoRA
            assert res["runtime_err_vs_float"] <= res["base_err_vs_float"] * 1.05 + 0.05, (fmt, res)
            assert res["online_modes"] == {fmt: "runtime"}, res
            # auto merges when Forge asks for it, unless a merge would lose too much of the delta
            assert res["merged_modes"][fmt] in ("merge", "runtime")
            assert res["merged_hooks"] == (1 if res["merged_modes"][fmt] == "runtime" else 0), res
            # the per-format choice in our options overrides Forge's switch, at the next refresh
            assert res["policy_runtime_hooks"] == 1 and res["policy_runtime_equal"], res
            assert res["policy_merge_hooks"] == 0 and res["policy_merge_modes"] == {fmt: "merge"}, res
            assert res["policy_merge_changes_output"] > 0, res
            # a format we cannot quantize is merged only when asked, into the requantize
            # target (Q8_0 by default); removing the LoRA brings back its own format and bytes
            expect = fmt if lib_gguf.get_format(fmt).can_quantize else "Q8_0"
            assert res["policy_merge_format"] == expect, res
            if res["merged_modes"][fmt] == "merge":
                assert res["policy_merge_equal"], res
            # Forge's memory management: swap load, unload, full load, a reload with the
            # same patches (Forge returns early): the run-time LoRA stays, bit for bit
            assert res["reload_hooks"] == 1 and res["reload_keeps_lora"], res
            assert res["strength_change"], res
        assert res["base_restored"], (fmt, res)
    assert lines[-1] == {"unregister_restores": True}


def test_sdxl_style_unet_files_from_other_tools_load_and_take_loras_in_forge(tmp_path):
    """An SDXL-layout UNet GGUF as ComfyUI-GGUF's tools write it (conv kernels quantized,
    tensors that are not whole rows of blocks stored reshaped with comfy.gguf.orig_shape)
    through Forge's own loader: conv kernels come back as float, the model runs, a LoRA on
    a transformer projection merges (into F16 where the rows are not whole blocks) and
    runs at run time alike, and removing it gives back every byte."""
    import lib_gguf

    formats = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]
    py = os.environ.get("FORGE_PYTHON", sys.executable)
    r = subprocess.run([py, str(ROOT / "tests" / "forge" / "run_forge_unet_check.py"), str(tmp_path), *formats],
                       capture_output=True, text=True, env=dict(os.environ), timeout=900)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [l.get("format") for l in lines] == formats, r.stderr[-3000:]
    for res in lines:
        fmt = res["format"]
        assert res["ok"], (fmt, res.get("error"), res.get("trace"))
        assert res["reshaped_in_file"] > 0 and res["storage_dtype"] == "gguf", res
        kind, dtype, shape = res["conv_weight"]
        assert kind == "Parameter" and dtype.startswith("torch.float") and shape == [64, 64, 3, 3], res
        assert res["proj_in"] == [fmt, [128, 128]] and res["runs"], res
        assert res["merge_modes"] == {fmt: "merge"} and res["runtime_modes"] == {fmt: "runtime"}, res
        f = lib_gguf.get_format(fmt)
        assert res["merge_format"] == (fmt if f.fits(128) else "F16") and res["runtime_format"] == fmt, res
        # merged: the same change as at run time, up to requantizing the weight once more
        assert res["lora_changes_output"] > 0 and res["merge_vs_runtime"] < 0.15, res
        assert 0.85 <= res["merge_keeps"] <= 1.15, res
        assert res["bytes_restored"] and res["base_restored"], res
