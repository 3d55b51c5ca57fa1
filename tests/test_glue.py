"""extension.py's Forge glue, on the objects Forge and Forge Neo hand it (no Forge needed).

The real hosts run these paths in tests/test_forge_integration.py and tests/webui/;
these tests pin the contracts those hosts rely on, in CI."""
import types

import pytest
import torch

import extension
import lib_gguf
from lib_gguf.sample import FluxConfig, tiny_flux_state_dict
from lib_lora.policy import LoraOptions


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    sd = tiny_flux_state_dict(FluxConfig(hidden_size=64, num_heads=2), seed=3)
    q = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("double_blocks") and v.shape[1] % 256 == 0:
            q[k] = lib_gguf.GGUFParameter(lib_gguf.quantize(v, "Q8_0"), "Q8_0", v.shape)
        else:
            q[k] = v.half() if v.ndim == 2 else v
    path = tmp_path_factory.mktemp("glue") / "tiny.gguf"
    lib_gguf.save(path, q)
    return str(path)


def _host_loader(calls):
    def load_torch_file(ckpt, safe_load=False, device=None, *, return_metadata=False):  # Neo's signature
        calls.append((ckpt, safe_load, device, return_metadata))
        sd = {"w": "host"}
        return (sd, {"format": "pt"}) if return_metadata else sd

    return load_torch_file


def test_every_tensor_counts_as_gguf_and_keeps_the_files_dtype(gguf_file):
    """Forge's ``state_dict_dtype`` calls a state dict GGUF when a value has a
    ``gguf_cls`` attribute, and its loader prints ``gguf_cls.__name__`` of the
    non-None ones: float tensors carry ``gguf_cls = None`` (as Forge's own do) and
    keep the file's dtype, so an F16 file is never turned into Forge's float32."""
    calls = []
    load = extension._make_loader(_host_loader(calls))
    sd = load(gguf_file)
    assert not calls
    assert all(hasattr(v, "gguf_cls") for v in sd.values())  # Forge: state_dict_dtype -> 'gguf'
    names = {v.gguf_cls.__name__ for v in sd.values() if v.gguf_cls is not None}
    assert names == {"Q8_0"}
    floats = {k: v for k, v in sd.items() if v.gguf_cls is None}
    assert floats and all(isinstance(v, torch.nn.Parameter) for v in floats.values())
    assert {v.gguf_float_format for v in floats.values() if v.ndim == 2} == {"F16"}
    assert all(v.dtype == torch.float16 for v in floats.values() if v.ndim == 2)
    assert {v.gguf_float_format for v in floats.values() if v.ndim == 1} == {"F32"}


def test_host_arguments_pass_through_and_neo_gets_its_metadata_tuple(gguf_file, tmp_path):
    calls = []
    load = extension._make_loader(_host_loader(calls))
    sd, meta = load(gguf_file, return_metadata=True)  # Forge Neo's split_state_dict asks this way
    assert meta is None and "double_blocks.0.img_attn.qkv.weight" in sd
    assert load(str(tmp_path / "x.safetensors"), True, "cpu", return_metadata=True) == ({"w": "host"}, {"format": "pt"})
    assert calls == [(str(tmp_path / "x.safetensors"), True, "cpu", True)]


def test_a_file_our_reader_refuses_goes_to_the_hosts_loader(tmp_path, caplog):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    calls = []
    load = extension._make_loader(_host_loader(calls))
    assert load(str(bad), device="cpu") == {"w": "host"}
    assert calls == [(str(bad), False, "cpu", False)]
    assert "broken.gguf" in caplog.text and "Forge's own GGUF loader" in caplog.text


class LoRAAdapter:  # the shape of Forge Neo's (ComfyUI's) weight adapter
    name = "lora"

    def __init__(self, weights):
        self.weights = weights


class LoHaAdapter:
    name = "loha"

    def __init__(self, weights):
        self.weights = weights


def test_neo_weight_adapters_and_forge_tuples_are_read_alike():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g)
    forge = [0.8, ("lora", (up, down, 4.0, None, None)), 1.0, None, None]
    neo = (0.8, LoRAAdapter((up, down, 4.0, None, None, None)), 1.0, None, None)
    loha = (1.0, LoHaAdapter((up, down, None, up, down, None, None, None)), 1.0, None, None)
    dora = (1.0, LoRAAdapter((up, down, 4.0, None, torch.ones(6), None)), 1.0, None, None)
    ours, theirs = extension.forge_patches_to_lib_lora("k", [forge, neo, loha, dora])
    assert theirs == [loha, dora]
    assert len(ours) == 2
    for patch, strength in ours:
        assert strength == 0.8 and patch.alpha == 4.0
        assert torch.equal(patch.tensors["up"], up) and torch.equal(patch.tensors["down"], down)
    assert extension.patch_kind(loha) == "loha" and extension.patch_kind(forge) == "lora"


def _loader_with(weight, key="blk.lin.weight"):
    layer = torch.nn.Module()
    layer.weight = weight
    blk = torch.nn.Module()
    blk.lin = layer
    model = torch.nn.Module()
    model.blk = blk
    return types.SimpleNamespace(model=model, backup={key: weight}), key


def _q4k_weight():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    return lib_gguf.GGUFParameter(lib_gguf.quantize(w, "Q4_K"), "Q4_K", w.shape)


def _lora(rows=8, cols=256, strength=1.0):
    g = torch.Generator().manual_seed(2)
    return [strength, ("lora", (torch.randn(rows, 2, generator=g), torch.randn(2, cols, generator=g), None, None,
                                None)), 1.0, None, None]


def test_the_format_option_routes_and_host_only_patches_are_merged():
    """Run time takes only the plain LoRAs; a LoHa on the same GGUF weight goes to the
    host's merge (every host applies that; Neo's GGUF layer ignores online patches)."""
    loader, key = _loader_with(_q4k_weight())
    lora = _lora()
    loha = (1.0, LoHaAdapter((None,) * 8), 1.0, None, None)
    modes = {}
    parts = extension._decide(loader, key, [lora, loha], False, LoraOptions(mode_by_format={"Q4_K": "runtime"}), modes)
    assert parts == [(True, [lora]), (False, [loha])] and modes == {"Q4_K": {"runtime", "merge"}}
    modes = {}
    parts = extension._decide(loader, key, [lora], True, LoraOptions(mode_by_format={"Q4_K": "merge"}), modes)
    assert parts == [(False, [lora])] and modes == {"Q4_K": {"merge"}}


def test_float_weights_of_a_gguf_file_follow_their_formats_option(gguf_file):
    sd = extension._make_loader(_host_loader([]))(gguf_file)
    w = sd["img_in.weight"]
    loader, key = _loader_with(w)
    lora = _lora(*w.shape)
    for opts, online, want in ((LoraOptions(mode_by_format={"F16": "runtime"}), False, True),
                               (LoraOptions(mode_by_format={"F16": "merge"}), True, False),
                               (LoraOptions(default_mode="runtime"), False, True),
                               (LoraOptions(), True, True), (LoraOptions(), False, False)):  # auto: Forge's switch
        modes = {}
        assert extension._decide(loader, key, [lora], online, opts, modes) == [(want, [lora])]
        assert modes == {"F16": {"runtime" if want else "merge"}}
    # Forge replaces the parameter (a dtype cast in its forward): the layer remembers the format
    extension._tag_float_layers(loader.model)
    loader.model.blk.lin.weight = torch.nn.Parameter(w.float(), requires_grad=False)
    loader.backup = {}
    assert extension._weight_and_format(loader, key)[2] == "F16"
    # a weight not from a GGUF file: Forge decides, whatever the options say
    plain, key2 = _loader_with(torch.nn.Parameter(torch.zeros(8, 256)))
    assert extension._decide(plain, key2, [lora], True, LoraOptions(default_mode="merge"), {}) == [(True, [lora])]


def test_modes_are_kept_per_loader_and_the_model_reports_its_own_parts():
    a = types.SimpleNamespace(_gguf_modes={"Q4_K": "runtime"})
    b = types.SimpleNamespace(_gguf_modes={"Q4_K": "merge", "F16": "merge"})
    vae = types.SimpleNamespace(_gguf_modes={})
    fo = types.SimpleNamespace(unet=types.SimpleNamespace(lora_loader=a),
                               clip=types.SimpleNamespace(patcher=types.SimpleNamespace(lora_loader=b)),
                               vae=types.SimpleNamespace(patcher=types.SimpleNamespace(lora_loader=vae)))
    model = types.SimpleNamespace(forge_objects=fo)
    assert extension.last_modes(model) == {"F16": "merge", "Q4_K": "merge+runtime"}
    assert extension.last_modes(types.SimpleNamespace(lora_loader=a)) == {"Q4_K": "runtime"}


def test_changed_options_refresh_only_loaded_parts_that_are_out_of_date(monkeypatch):
    import sys

    refreshed = []

    def patcher(name, sig):
        loader = types.SimpleNamespace(_gguf_options_sig=sig)
        return types.SimpleNamespace(lora_loader=loader, refresh_loras=lambda: refreshed.append(name))

    monkeypatch.setitem(extension._state, "options", lambda: LoraOptions(mode_by_format={"Q4_K": "merge"}))
    now = extension.options_signature()
    unet, clip, vae = patcher("unet", "old"), patcher("clip", now), patcher("vae", "old")
    fo = types.SimpleNamespace(unet=unet, clip=types.SimpleNamespace(patcher=clip),
                               vae=types.SimpleNamespace(patcher=vae))
    mm = types.SimpleNamespace(current_loaded_models=[types.SimpleNamespace(model=unet),
                                                      types.SimpleNamespace(model=clip)])
    backend = types.ModuleType("backend")
    backend.memory_management = mm
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", mm)
    # the unet is loaded and stale; the clip is up to date; the VAE is stale but not
    # loaded (Forge refreshes it when it loads it)
    assert extension.apply_options_now(types.SimpleNamespace(forge_objects=fo)) == 1
    assert refreshed == ["unet"]


def test_gguf_formats_have_the_name_forge_prints():
    for f in lib_gguf.FORMATS.values():
        assert f.__name__ == f.name
    assert lib_gguf.GGMLFormat.__name__ == "GGMLFormat"


def test_a_lora_with_non_finite_values_or_strength_is_skipped_whole(caplog):
    """A NaN in one LoRA tensor (or an infinite strength) would turn rows of the weight
    into NaN or zeros: that LoRA is skipped with a message naming it and the key; the
    other LoRAs still apply."""
    loader, key = _loader_with(_q4k_weight())
    good = _lora()
    nan_up = _lora()
    nan_up[1][1][0][0, 0] = float("nan")
    opts = LoraOptions(mode_by_format={"Q4_K": "runtime"})
    patches = {("good.safetensors", 1.0, 1.0, False): {key: [good]},
               ("broken.safetensors", 1.0, 1.0, False): {key: [nan_up]},
               ("huge.safetensors", float("inf"), 1.0, False): {key: [_lora()]}}
    routed, modes = extension.route_patches(loader, patches, opts)
    assert list(routed) == [("good.safetensors", 1.0, 1.0, True)] and modes == {"Q4_K": "runtime"}
    assert "broken.safetensors" in caplog.text and key in caplog.text and "NaN" in caplog.text
    assert "huge.safetensors" in caplog.text and "not finite" in caplog.text


def test_sdxl_style_files_conv_kernels_dequantized_once_and_reshaped_rows_merge_into_f16(tmp_path):
    """ComfyUI-GGUF's SDXL/SD1.5 files: quantized conv kernels (Forge's GGUF operations
    dequantize Linear weights only) come back as float16 tensors of the model's shape;
    a weight whose rows are not whole blocks (stored reshaped) takes a merged LoRA as
    F16 (Forge's backup gives the file's bytes back when the LoRA goes)."""
    g = torch.Generator().manual_seed(4)
    conv = torch.randn(320, 4, 8, 8, generator=g)
    proj = torch.randn(640, 640, generator=g)
    sd = {"input_blocks.0.0.weight": lib_gguf.GGUFParameter(lib_gguf.quantize(conv.reshape(-1, 256), "Q8_0"),
                                                            "Q8_0", conv.shape),
          "input_blocks.1.1.proj_in.weight": lib_gguf.GGUFParameter(lib_gguf.quantize(proj.reshape(-1, 256), "Q4_K"),
                                                                    "Q4_K", proj.shape),
          "input_blocks.1.1.proj_in.bias": torch.zeros(640)}
    path = tmp_path / "unet.gguf"
    lib_gguf.save(path, sd, {"general.architecture": "sdxl"})
    got = extension._make_loader(_host_loader([]))(str(path))
    c = got["input_blocks.0.0.weight"]
    assert c.gguf_cls is None and c.dtype == torch.float16 and tuple(c.shape) == (320, 4, 8, 8)
    assert torch.equal(c, sd["input_blocks.0.0.weight"].dequantize(torch.float16))
    w = got["input_blocks.1.1.proj_in.weight"]
    assert w.gguf_cls.name == "Q4_K" and tuple(w.shape) == (640, 640)
    loader, key = _loader_with(w)
    parts = extension._decide(loader, key, [_lora(640, 640)], False, LoraOptions(mode_by_format={"Q4_K": "merge"}), {})
    assert parts[0][0] is False  # merged
    merged = lib_gguf.dequantize(w, torch.float32) + 0.01
    w.gguf_cls.quantize_pytorch(merged, w)  # what Forge's LoRA loader calls
    assert w.gguf_cls.name == "F16" and tuple(w.shape) == (640, 640)
    assert torch.equal(lib_gguf.dequantize(w, torch.float32), merged.half().float())


def _iq2_xxs_weight(rows=8, cols=256):
    """An IQ2_XXS weight (random bytes; we have no quantizer for it)."""
    fmt = lib_gguf.get_format("IQ2_XXS")
    data = torch.randint(0, 256, (rows, cols // fmt.block_size * fmt.type_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))
    return lib_gguf.GGUFParameter(data, fmt, (rows, cols))


def test_a_format_we_cannot_quantize_is_merged_only_when_its_option_says_merge():
    """The README's rule, from the one policy: IQ2_XXS in "auto" runs at run time even with
    Forge's switch off; with "merge" it is merged into the requantize target."""
    lora = _lora()
    for opts, online, want, target in (
            (LoraOptions(default_gguf_mode="auto"), False, True, None),
            (LoraOptions(mode_by_format={"IQ2_XXS": "merge"}), True, False, "Q8_0"),
            (LoraOptions(mode_by_format={"IQ2_XXS": "merge"}, requantize_target={"IQ2_XXS": "Q4_K"}), True, False,
             "Q4_K")):
        w = _iq2_xxs_weight()
        loader, key = _loader_with(w)
        modes = {}
        assert extension._decide(loader, key, [lora], online, opts, modes) == [(want, [lora])]
        assert modes == {"IQ2_XXS": {"runtime" if want else "merge"}}
        if target is not None:
            assert w.requantize_to == target  # what Forge's merge writes (quantize_pytorch)


def test_auto_moves_a_lossy_merge_to_run_time_and_merge_stays_merge():
    """In "auto" with Forge's switch off, a merge that would keep little of a tiny delta
    runs at run time; the format's "merge" is merged whatever it keeps."""
    loader, key = _loader_with(_q4k_weight())
    tiny = _lora(strength=1e-3)
    assert extension._decide(loader, key, [tiny], False, LoraOptions(default_gguf_mode="auto"), {}) == [(True, [tiny])]
    assert extension._decide(loader, key, [tiny], False, LoraOptions(default_gguf_mode="merge"), {}) == \
        [(False, [tiny])]
    big = _lora(strength=1.0)
    assert extension._decide(loader, key, [big], False, LoraOptions(default_gguf_mode="auto"), {}) == [(False, [big])]


def test_run_time_is_for_linear_weights_only():
    """A conv kernel of a GGUF file (float after loading) with the run-time option: the
    policy merges it (a run-time delta is a Linear's ``x @ W.T``)."""
    conv = torch.nn.Conv2d(4, 8, 3)
    conv.weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3).half(), requires_grad=False)
    conv.weight.gguf_cls, conv.weight.gguf_float_format = None, "F16"
    model = torch.nn.Module()
    model.conv = conv
    loader = types.SimpleNamespace(model=model, backup={"conv.weight": conv.weight})
    lora = [1.0, ("lora", (torch.randn(8, 2), torch.randn(2, 4, 3, 3), None, None, None)), 1.0, None, None]
    modes = {}
    assert extension._decide(loader, "conv.weight", [lora], True, LoraOptions(mode_by_format={"F16": "runtime"}),
                             modes) == [(False, [lora])]
    assert modes == {"F16": {"merge"}}
