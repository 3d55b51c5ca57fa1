"""Issue 12: convert, bake and GGUFParameter never lose data, never write broken
weights, never compute on raw bytes."""
import hashlib
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lib_gguf
from lib_gguf import GGUFFormatError, GGUFParameter, is_gguf
from lib_gguf.errors import GGUFOperationError
from lib_gguf.sample import tiny_flux_state_dict
from lib_lora import LoraError, apply_loras
from lib_lora.bake import bake_loras

sys.path.insert(0, str(Path(__file__).parent))
from test_bake import model  # noqa: E402,F401  (the same Q5_0 model file fixture)

ROOT = Path(__file__).resolve().parents[1]
H, R = 256, 8
QKV = "double_blocks.0.img_attn.qkv.weight"
LORA_UP = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
LORA_DOWN = "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"


def _cli(*args, timeout=300, package="lib_gguf", **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", package, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def _bake_cli(*args, **kw):
    return _cli("bake", *args, package="lib_lora", **kw)


# -- GGUFParameter: no computing on raw bytes ----------------------------------------

@pytest.fixture()
def w():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    return GGUFParameter(lib_gguf.quantize(x, "Q8_0"), "Q8_0", (16, 64))


def test_math_on_a_gguf_weight_uses_its_values(w):
    ref = w.dequantize(torch.float32)
    assert torch.equal(w.float(), ref) and torch.equal(w.half(), ref.half())
    assert torch.equal(w.bfloat16(), ref.bfloat16()) and torch.equal(w.double(), ref.double())
    assert torch.equal(w * 2, ref * 2) and torch.equal(2 * w, ref * 2) and not is_gguf(w * 2)
    assert torch.equal(w.sum(), ref.sum()) and torch.equal(w[3], ref[3]) and torch.equal(w.T, ref.T)
    x = torch.randn(5, 64)
    assert torch.equal(F.linear(x, w), F.linear(x, ref))
    assert F.linear(x.half(), w).dtype == torch.float16  # dequantized to the activation's dtype
    assert torch.equal(torch.matmul(x, w.t()), x @ ref.t())
    assert torch.equal(w.to(torch.float16), ref.half())  # a dtype alone: the values in that dtype
    assert torch.equal(torch.tensor(np.asarray(w)), ref)
    assert torch.equal(lib_gguf.dequantize(w, torch.float32), ref) and lib_gguf.dequantize(w).dtype == torch.float16
    assert torch.equal(lib_gguf.dequantize(w, dtype=torch.float32), ref)
    # the shape it reports is the logical one, everywhere
    assert w.size() == w.shape == (16, 64) and w.size(-1) == 64 and w.byte_shape == (16, 68)


def test_host_operations_keep_the_bytes(w):
    raw = w.data
    assert type(raw) is torch.Tensor and raw.dtype == torch.uint8 and raw.shape == (16, 68)
    # memory accounting counts bytes
    assert w.numel() == w.nelement() == 16 * 68 and w.element_size() == 1 and w.nbytes == 16 * 68
    assert w.dtype == torch.uint8 and w.device.type == "cpu" and not w.is_floating_point() and not w.is_cuda
    assert w.data_ptr() == raw.data_ptr() and w.untyped_storage().nbytes() == 16 * 68
    for q in (w.to("cpu", torch.float16, non_blocking=True), w.to(device="cpu", dtype=torch.bfloat16), w.detach(),
              torch.nn.Parameter(w, requires_grad=False), torch.empty_like(w, dtype=torch.float16).copy_(w)):
        assert isinstance(q, GGUFParameter) and q.gguf_cls is w.gguf_cls and torch.equal(q.data, raw)
    m = torch.nn.Linear(64, 16, bias=True)
    m.weight = w
    m.half()
    m.to(torch.float32)
    m.to("cpu")
    assert m.weight.gguf_cls is w.gguf_cls and torch.equal(m.weight.data, raw) and m.bias.dtype == torch.float32
    # a float buffer receives the values, a byte buffer of the same layout the bytes
    f = torch.empty(16, 64)
    f.copy_(w)
    assert torch.equal(f, w.dequantize(torch.float32))
    b = torch.empty(16, 68, dtype=torch.uint8)
    b.copy_(w)
    assert torch.equal(b, raw)


def test_saved_parameter_loads_with_torch_load_defaults(w):
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["w"]
    assert isinstance(back, GGUFParameter) and back.gguf_cls is w.gguf_cls and torch.equal(back.data, w.data)


def test_requires_grad_on_a_module_leaves_gguf_weights_frozen(w, caplog):
    m = torch.nn.Linear(64, 16)
    m.weight = w
    with caplog.at_level(logging.WARNING, logger="lib_gguf.parameter"):
        m.requires_grad_(True)
    assert not m.weight.requires_grad and m.bias.requires_grad
    assert torch.equal(m.weight.data, w.data)


@pytest.mark.parametrize("op", [
    lambda w: w.mul_(2), lambda w: w.zero_(), lambda w: w.__setitem__(0, 1.0), lambda w: w.add_(1),
    lambda w: torch.nn.init.normal_(w), lambda w: w.copy_(torch.randn(16, 64)),
    lambda w: setattr(w, "data", torch.randn(16, 64)), lambda w: w.to(torch.int8),
    lambda w: torch.add(torch.ones(1), torch.ones(1), out=w),
], ids=["mul_", "zero_", "setitem", "add_", "init", "copy_float", "data_float", "to_int8", "out"])
def test_what_would_corrupt_the_bytes_raises_and_says_what_to_call(w, op):
    before = w.data.clone()
    with pytest.raises(GGUFOperationError) as e:
        op(w)
    assert "Q8_0" in str(e.value) and ("quantize" in str(e.value) or "dequantize" in str(e.value)
                                       or "float tensor" in str(e.value))
    assert torch.equal(w.data, before)


# -- fixtures for files -----------------------------------------------------------------

def _lora(path, up=None, down=None, **extra):
    g = torch.Generator().manual_seed(0)
    up = torch.randn(3 * H, R, generator=g) * 0.1 if up is None else up
    down = torch.randn(R, H, generator=g) * 0.1 if down is None else down
    save_file({LORA_UP: up, LORA_DOWN: down, **extra}, str(path))
    return path


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# -- 1. an output that is one of the inputs, or a folder ---------------------------------

def test_bake_refuses_an_output_that_is_an_input(tmp_path, model):
    lora = _lora(tmp_path / "style.safetensors")
    before = lora.read_bytes(), model.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(lora)
    for out in (lora, tmp_path / "sub" / ".." / "style.safetensors", tmp_path / "link.safetensors", model):
        r = _bake_cli(model, f"{lora}:0.5", "-o", out)
        assert r.returncode == 2 and "one of the inputs" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert str(out) in r.stderr
    assert (lora.read_bytes(), model.read_bytes()) == before
    assert _listing(tmp_path) == ["link.safetensors", "m.gguf", "style.safetensors", "sub"]


def test_convert_refuses_an_input_or_a_folder_as_output(tmp_path):
    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    rules = tmp_path / "rules.txt"
    rules.write_text("*_mlp.* = Q8_0\n")
    before = src.read_bytes()
    (tmp_path / "alias.gguf").symlink_to(src)
    for dst in (src, tmp_path / "alias.gguf", rules):
        with pytest.raises(GGUFFormatError, match="one of the inputs"):
            lib_gguf.convert(src, dst, "Q8_0", rules=rules)
    (tmp_path / "out").mkdir()
    import lib_gguf.converter as converter

    planned = []
    real_plan = converter.plan_source
    converter.plan_source = lambda *a, **k: planned.append(1) or real_plan(*a, **k)
    try:
        with pytest.raises(GGUFFormatError, match="is an existing folder"):
            lib_gguf.convert(src, tmp_path / "out", "Q8_0")
    finally:
        converter.plan_source = real_plan
    assert not planned  # refused before any work
    r = _cli("convert", src, tmp_path / "out", "--type", "Q8_0")
    assert r.returncode == 2 and "is an existing folder" in r.stderr and "Traceback" not in r.stderr
    assert src.read_bytes() == before and rules.read_text() == "*_mlp.* = Q8_0\n"
    assert _listing(tmp_path) == ["alias.gguf", "flux.safetensors", "out", "rules.txt"]
    assert _listing(tmp_path / "out") == []


# -- 2. interrupted writes leave nothing behind ---------------------------------------------

def _slow_source(tmp_path):
    from lib_gguf.sample import FluxConfig

    src = tmp_path / "slow.safetensors"
    save_file(tiny_flux_state_dict(FluxConfig(hidden_size=512, depth=2, depth_single_blocks=2, context_in_dim=512)),
              str(src))
    return src


def _start_convert(src, dst):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LIB_GGUF_BACKEND="torch")
    proc = subprocess.Popen([sys.executable, "-m", "lib_gguf", "convert", str(src), str(dst), "--type", "Q4_K_S"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        temps = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
        if temps:
            return proc, temps
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no temporary file appeared")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_remove_the_partial_file_at_once(tmp_path, sig, rc):
    src = _slow_source(tmp_path)
    dst = tmp_path / "out.gguf"
    proc, _ = _start_convert(src, dst)
    time.sleep(0.3)
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 3, "the process took its time to stop"
    assert proc.returncode == rc, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("quantizing")]  # less the progress bar
    assert len(lines) == 1 and "partial output was removed" in lines[0], err
    assert _listing(tmp_path) == ["slow.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_next_run_removes_what_a_killed_one_left(tmp_path, caplog):
    src = _slow_source(tmp_path)
    dst = tmp_path / "out.gguf"
    proc, temps = _start_convert(src, dst)
    proc.kill()  # SIGKILL: nothing runs, the temporary file stays
    proc.communicate(timeout=60)
    assert all(p.exists() for p in temps)
    unrelated = [tmp_path / f".{dst.name}.notes.tmp", tmp_path / f".{dst.name}.123-x.tmp", tmp_path / "keep.partial"]
    for p in unrelated:
        p.write_text("mine")
    with caplog.at_level(logging.WARNING, logger="lib_gguf.writer"):
        lib_gguf.save(dst, {"a": torch.zeros(4)})
    assert not any(p.exists() for p in temps)
    assert all(p.read_text() == "mine" for p in unrelated)  # only our own temporary files go
    assert "interrupted earlier write" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_running_writer_s_temporary_file_is_left_alone(tmp_path):
    """Another process writing the same output: its temporary file is not stale."""
    from lib_gguf.writer import remove_stale_temps

    src = _slow_source(tmp_path)
    dst = tmp_path / "out.gguf"
    proc, temps = _start_convert(src, dst)
    assert remove_stale_temps(dst) == [] and all(p.exists() for p in temps)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _listing(tmp_path) == ["out.gguf", "slow.safetensors"]


# -- 3. non-finite LoRAs and strengths --------------------------------------------------

def test_a_lora_holding_nan_is_refused_naming_file_and_key(tmp_path, model):
    up = torch.randn(3 * H, R) * 0.1
    up[0, 3] = float("nan")
    lora = _lora(tmp_path / "nan.safetensors", up=up)
    out = tmp_path / "o.gguf"
    with pytest.raises(LoraError) as e:
        bake_loras(model, [(lora, 1.0)], out)
    assert "nan.safetensors" in str(e.value) and LORA_UP in str(e.value) and "NaN" in str(e.value)
    r = _bake_cli(model, lora, "-o", out)
    assert r.returncode == 2 and LORA_UP in r.stderr and "Traceback" not in r.stderr
    mod = _module(model)
    with pytest.raises(LoraError, match="nan.safetensors"):
        apply_loras(mod, [(str(lora), 1.0)], mode="merge")
    assert not out.exists()


def _module(path=None):
    from lib_gguf.sample import build_module, flux_shapes

    m = build_module(flux_shapes())
    if path is not None:
        lib_gguf.load_into(m, path)
    return m


@pytest.mark.parametrize("strength", ["inf", "nan", "-inf"])
def test_non_finite_strengths_are_refused(tmp_path, model, strength):
    lora = _lora(tmp_path / "style.safetensors")
    out = tmp_path / "o.gguf"
    r = _bake_cli(model, f"{lora}:{strength}", "-o", out)
    assert r.returncode == 2 and "finite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
    mod = _module(model)
    for mode in ("merge", "runtime"):
        with pytest.raises(LoraError, match="finite"):
            apply_loras(mod, [(str(lora), float(strength))], mode=mode)
    h = apply_loras(mod, [(str(lora), 0.5)], mode="runtime")
    with pytest.raises(LoraError, match="finite"):
        h.set_strength(0, float(strength))
    assert h.strengths == [0.5]
    h.remove()


@pytest.mark.parametrize("strength,needle", [(1e41, "inf or NaN"), (1e8, "beyond what Q5_0 holds")])
def test_a_merge_that_overflows_is_refused(tmp_path, model, strength, needle):
    lora = _lora(tmp_path / "style.safetensors")
    with pytest.raises(LoraError, match=needle) as e:
        bake_loras(model, [(lora, strength)], tmp_path / "o.gguf")
    assert QKV in str(e.value)
    with pytest.raises(LoraError, match=needle):
        apply_loras(_module(model), [(str(lora), strength)], mode="merge")
    assert not (tmp_path / "o.gguf").exists()


def test_baked_metadata_is_standard_json(tmp_path, model):
    lora = _lora(tmp_path / "style.safetensors")
    out = tmp_path / "o.gguf"
    bake_loras(model, [(lora, 0.25)], out)
    raw = lib_gguf.read_metadata(out)["forge_gguf_lora.loras"]
    rec = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert rec == [{"file": "style.safetensors", "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                    "strength": 0.25}]


# -- 4. file modes ----------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_outputs_get_the_mode_open_would_give(tmp_path, model):
    old = os.umask(0o022)
    try:
        p = tmp_path / "new.gguf"
        lib_gguf.save(p, {"a": torch.zeros(4)})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o027)
        q = tmp_path / "q.gguf"
        lib_gguf.save(q, {"a": torch.zeros(4)})
        assert stat.S_IMODE(q.stat().st_mode) == 0o640
        # replacing a file keeps its mode, as open(path, "wb") would
        os.chmod(p, 0o664)
        lib_gguf.save(p, {"a": torch.ones(4)})
        assert stat.S_IMODE(p.stat().st_mode) == 0o664
        os.umask(0o022)
        baked = tmp_path / "baked.gguf"
        bake_loras(model, [(_lora(tmp_path / "style.safetensors"), 1.0)], baked)
        assert stat.S_IMODE(baked.stat().st_mode) == 0o644
    finally:
        os.umask(old)


# -- 5. empty and incomplete LoRAs --------------------------------------------------------

def test_an_empty_lora_says_so(tmp_path, model):
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(LoraError, match=r"empty\.safetensors.*holds no tensors"):
        bake_loras(model, [(empty, 1.0)], tmp_path / "o.gguf")
    r = _bake_cli(model, empty, "-o", tmp_path / "o.gguf")
    assert r.returncode == 2 and "holds no tensors" in r.stderr


def test_an_incomplete_lora_names_the_missing_key(tmp_path, model):
    half = tmp_path / "half.safetensors"
    save_file({LORA_DOWN: torch.zeros(R, H), "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(8.0)},
              str(half))
    with pytest.raises(LoraError) as e:
        bake_loras(model, [(half, 1.0)], tmp_path / "o.gguf")
    msg = str(e.value)
    assert "incomplete" in msg and repr(LORA_DOWN) in msg and repr(LORA_UP) in msg and "another architecture" not in msg


def test_unplaced_keys_are_listed_under_the_file_s_own_names(tmp_path, model):
    g = torch.Generator().manual_seed(1)
    lora = tmp_path / "mixed.safetensors"
    stray = "lora_unet_no_such_layer.lora_down.weight"
    save_file({LORA_UP: torch.randn(3 * H, R, generator=g), LORA_DOWN: torch.randn(R, H, generator=g),
               stray: torch.zeros(R, H), "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, R),
               "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.zeros(R, H)}, str(lora))
    result = bake_loras(model, [(lora, 1.0)], tmp_path / "o.gguf")
    text = result.text()
    assert f"mixed.safetensors: {stray}" in text
    assert "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight" in text
    assert "has no 'lora_unet_double_blocks_0_img_mlp_0.lora_up.weight'" in text


# -- errors that used to escape as tracebacks ---------------------------------------------

def test_a_read_only_folder_is_one_line_naming_the_users_path(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.gguf.1-x.forge-gguf-lora-partial"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.convert(src, tmp_path / "out.gguf", "Q8_0")
    msg = str(e.value)
    assert "out.gguf" in msg and "Read-only file system" in msg and "partial" not in msg
    with pytest.raises(GGUFFormatError) as e:  # save on its own, too
        lib_gguf.save(tmp_path / "direct.gguf", {"a": torch.zeros(4)})
    assert "direct.gguf" in str(e.value) and "Read-only" in str(e.value) and "partial" not in str(e.value)


def test_not_enough_disk_space_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    calls = []
    monkeypatch.setattr("lib_gguf.converter._PlannedTensor.materialize", lambda self: calls.append(1))
    with pytest.raises(GGUFFormatError, match="not enough free disk space") as e:
        lib_gguf.convert(src, tmp_path / "out.gguf", "Q8_0")
    assert "out.gguf" in str(e.value) and not calls
    assert _listing(tmp_path) == ["flux.safetensors"]


def test_a_disk_that_fills_while_writing_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    import lib_gguf.writer as writer

    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    monkeypatch.setattr(writer.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    dst = tmp_path / "out.gguf"
    with pytest.raises(GGUFFormatError, match="disk is full") as e:
        lib_gguf.save(dst, {"a": torch.zeros(4096)})
    assert "out.gguf" in str(e.value)
    assert _listing(tmp_path) == []


# -- messages ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["IQ2_XXS", "IQ1_S", "IQ2_XS"])
def test_importance_matrix_formats_say_so(tmp_path, fmt):
    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    r = _cli("convert", src, tmp_path / "o.gguf", "--type", fmt)
    assert r.returncode == 2 and "importance matrix" in r.stderr and "unknown recipe" not in r.stderr
    rules = tmp_path / "rules.txt"
    rules.write_text(f"double_blocks.* = {fmt}\n")
    with pytest.raises(GGUFFormatError, match="importance matrix") as e:
        lib_gguf.convert(src, tmp_path / "o.gguf", "Q4_K_S", rules=rules)
    assert "rules.txt" in str(e.value) and "double_blocks.*" in str(e.value)
    assert not (tmp_path / "o.gguf").exists()


def test_a_nan_error_names_the_file(tmp_path):
    sd = tiny_flux_state_dict()
    sd["single_blocks.0.linear2.weight"][0, 0] = float("inf")
    src = tmp_path / "broken.safetensors"
    save_file(sd, str(src))
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.convert(src, tmp_path / "o.gguf", "Q8_0")
    assert "broken.safetensors" in str(e.value) and "single_blocks.0.linear2.weight" in str(e.value)


def test_convert_help_lists_every_preset():
    from lib_gguf.recipes import PRESETS

    r = _cli("convert", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and all(p in text for p in PRESETS), text


def test_a_missing_output_folder_is_created_and_said(tmp_path):
    src = tmp_path / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    dst = tmp_path / "new" / "folder" / "o.gguf"
    r = _cli("convert", src, dst, "--type", "Q8_0")
    assert r.returncode == 0 and dst.exists()
    assert "created the output folder" in r.stderr and str(dst.parent) in r.stderr
