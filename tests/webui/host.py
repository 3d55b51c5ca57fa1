"""Drive a real web UI host (Stable Diffusion WebUI Forge; later Forge Neo) for tests.

``WebUIHost(forge_dir, python, kind="forge")`` makes a throw-away copy of a host checkout,
installs this extension into it as a user does (a ``git clone`` into ``extensions/``, then
Forge's launcher runs its ``install.py``), writes small random-weight models, shrinks the
model sizes the host hard-codes (in the copy only) so that those models load, launches the
web UI on 127.0.0.1 and drives its HTTP API::

    host = WebUIHost(os.environ["FORGE_DIR"], os.environ["FORGE_PYTHON"])
    host.prepare(formats=["Q8_0"])          # copy, install, models, shrink (idempotent)
    with host:                              # start() ... stop(): the server is always killed
        host.set_options(sd_model_checkpoint=host.checkpoint("Q8_0"),
                         forge_additional_modules=host.modules())
        r = host.txt2img(prompt=f"a cat {host.lora_tag(0.8)}")
        r.info, r.pixels(), r.seconds

Nothing here imports the host: it runs in the test's interpreter and talks HTTP; the
models are written by ``make_models.py`` in the host's interpreter.
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSION_NAME = "forge-gguf-lora"
LORA_NAME = "tiny-flux-lora"

# The sizes of the small models, and what the host's configs are shrunk to. Flux: hidden
# 256 (2 heads of 128 = sum of axes_dim 16+56+56), one double and one single block; its
# context width is the T5's d_model and its pooled width the CLIP-L's (768: Forge only
# recognises a CLIP-L file 768 wide).
TINY: Dict[str, dict] = {
    "flux": {"hidden_size": 256, "num_heads": 2, "depth": 1, "depth_single_blocks": 1},
    "clip_l": {"hidden_size": 768, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 12,
               "projection_dim": 768},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2},
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32},
}


class HostError(RuntimeError):
    """The host failed to start, died, or answered an error; ``log_tail`` says why."""

    def __init__(self, msg: str, log_tail: str = ""):
        super().__init__(msg + (f"\n--- host log (tail) ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


# --------------------------------------------------------------------------------------
# host kinds: what differs between Forge and its forks lives here
# --------------------------------------------------------------------------------------
class HostKind:
    name = "?"
    cpu_args: tuple = ()

    def launch_args(self, port: int, data_dir: str, models_dir: str) -> List[str]:
        return ["launch.py", *self.cpu_args, "--api", "--port", str(port), "--data-dir", data_dir,
                "--models-dir", models_dir]

    def shrink(self, copy_dir: str, sizes: dict) -> List[str]:
        """Shrink the sizes the host hard-codes, in the copy; returns what it changed."""
        raise NotImplementedError

    def env(self) -> Dict[str, str]:
        return {}

    def extensions_dir(self, copy_dir: str, data_dir: str) -> str:
        """Where users' extensions live: with ``--data-dir``, ``DATA/extensions``
        (``modules/paths_internal.py``), not the checkout's ``extensions/``."""
        return os.path.join(data_dir, "extensions")


def _sub_once(text: str, pattern: str, repl: str, what: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if n != 1:
        raise HostError(f"shrinking the host: expected one match of {what!r}, found {n} "
                        "(the host's source changed; update tests/webui/host.py)")
    return new


def _patch_json(path: str, values: dict, changed: List[str]) -> None:
    with open(path, encoding="utf8") as fh:
        cfg = json.load(fh)
    for k, v in values.items():
        if k in cfg and cfg[k] != v:
            changed.append(f"{os.path.relpath(path)}: {k} {cfg[k]} -> {v}")
            cfg[k] = v
    _replace_file(path, json.dumps(cfg, indent=2))


def _replace_file(path: str, text: str) -> None:
    """Write a new file (never through a hard link into the original checkout)."""
    tmp = path + ".tmp-webui-test"
    with open(tmp, "w", encoding="utf8") as fh:
        fh.write(text)
    os.replace(tmp, path)


class ForgeKind(HostKind):
    """lllyasviel/stable-diffusion-webui-forge (dfdcbab6 and near)."""

    name = "forge"
    cpu_args = ("--always-cpu", "--skip-torch-cuda-test")
    flux_repo = os.path.join("backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
    detection = os.path.join("repositories", "huggingface_guess", "huggingface_guess", "detection.py")

    # huggingface_guess builds every Flux at FLUX.1's sizes; read them from the state dict
    # instead (the key names are the BFL layout's; `count_blocks` is detection.py's own helper;
    # int(): a GGUF tensor's shape may hold numpy integers, and numpy's uint64 // int is a float)
    FLUX_FROM_STATE_DICT = {
        "in_channels": "int(state_dict['{}img_in.weight'.format(key_prefix)].shape[1]) // 4",
        "vec_in_dim": "int(state_dict['{}vector_in.in_layer.weight'.format(key_prefix)].shape[1])",
        "context_in_dim": "int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[1])",
        "hidden_size": "int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[0])",
        "num_heads": ("int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[0]) // "
                      "int(state_dict['{}double_blocks.0.img_attn.norm.key_norm.scale'.format(key_prefix)].shape[0])"),
        "depth": "count_blocks(state_dict_keys, '{}double_blocks.'.format(key_prefix) + '{}.')",
        "depth_single_blocks": "count_blocks(state_dict_keys, '{}single_blocks.'.format(key_prefix) + '{}.')",
    }

    def flux_edits(self) -> Dict[str, tuple]:
        """``dit_config`` key -> (regular expression of the line's value, expression reading
        the size from the state dict)."""
        return {key: (r".*", expr) for key, expr in self.FLUX_FROM_STATE_DICT.items()}

    def shrink(self, copy_dir: str, sizes: dict) -> List[str]:
        changed: List[str] = []
        self._patch_detection(copy_dir, changed)
        self._patch_configs(copy_dir, sizes, changed)
        return changed

    def _patch_detection(self, copy_dir: str, changed: List[str]) -> None:
        """Only inside the Flux branch of huggingface_guess: from its test key to its
        ``return dit_config``."""
        det = os.path.join(copy_dir, self.detection)
        with open(det, encoding="utf8") as fh:
            text = fh.read()
        start = text.index("double_blocks.0.img_attn.norm.key_norm.scale")
        end = text.index("return dit_config", start)
        block = text[start:end]
        for key, (value, expr) in self.flux_edits().items():
            block = _sub_once(block, rf'^(\s*dit_config\["{key}"\] = ){value}\s*$', lambda m, e=expr: m.group(1) + e,
                              f'dit_config["{key}"] = ...')
            changed.append(f"{self.detection}: Flux {key} read from the state dict")
        _replace_file(det, text[:start] + block + text[end:])

    def _patch_configs(self, copy_dir: str, sizes: dict, changed: List[str]) -> None:
        for sub, key in (("text_encoder", "clip_l"), ("text_encoder_2", "t5"), ("vae", "vae")):
            _patch_json(os.path.join(copy_dir, self.flux_repo, sub, "config.json"), sizes[key], changed)


class NeoKind(ForgeKind):
    """Forge Neo (Haoming02/sd-webui-forge-classic, branch neo; run here from its derivative
    snapshot papaioannou-themistoklis/WebUI-Neo-Forge): its own CPU flags, ``--model-ref``
    for the models folder, ``huggingface_guess`` vendored under ``modules_forge/packages``
    (depth and widths of the input layers already read from the state dict; context width,
    hidden size and heads fixed), nothing to git-clone at launch."""

    name = "neo"
    # CPU attention: without --attention-pytorch Neo's basic attention reads an argument no
    # parser defines
    cpu_args = ("--always-cpu", "--attention-pytorch", "--skip-torch-cuda-test", "--skip-version-check")
    detection = os.path.join("modules_forge", "packages", "huggingface_guess", "detection.py")
    FLUX_FIXED = {  # key: (Neo's fixed value, read from the state dict instead)
        "context_in_dim": ("4096", "int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[1])"),
        "hidden_size": ("3072", "int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[0])"),
        "num_heads": ("24", "int(state_dict['{}txt_in.weight'.format(key_prefix)].shape[0]) // "
                            "int(state_dict['{}double_blocks.0.img_attn.norm.key_norm.scale'.format(key_prefix)]"
                            ".shape[0])"),
    }
    REQS = "requirements-webui-test.txt"

    def launch_args(self, port: int, data_dir: str, models_dir: str) -> List[str]:
        return ["launch.py", *self.cpu_args, "--api", "--port", str(port), "--data-dir", data_dir,
                "--model-ref", models_dir]

    def env(self) -> Dict[str, str]:
        # the launcher's requirements check, less torch and setuptools (ours are pinned by the
        # test venv): otherwise it runs `pip install -r`, which needs the network
        return {"REQS_FILE": self.REQS}

    def flux_edits(self) -> Dict[str, tuple]:
        return {key: (fixed, expr) for key, (fixed, expr) in self.FLUX_FIXED.items()}

    def shrink(self, copy_dir: str, sizes: dict) -> List[str]:
        changed = super().shrink(copy_dir, sizes)
        with open(os.path.join(copy_dir, "requirements.txt"), encoding="utf8") as fh:
            reqs = [l for l in fh.read().splitlines() if not re.match(r"\s*(torch|setuptools)\b", l)]
        _replace_file(os.path.join(copy_dir, self.REQS), "\n".join(reqs) + "\n")
        changed.append(f"{self.REQS}: the launcher's requirements less torch and setuptools")
        return changed


KINDS = {"forge": ForgeKind, "neo": NeoKind}


# --------------------------------------------------------------------------------------
# the host
# --------------------------------------------------------------------------------------
@dataclass
class Txt2ImgResult:
    images: List[bytes]
    info: str
    parameters: dict
    seconds: float
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def infotext(self) -> str:
        """The image's infotext (the web UI's ``info`` JSON carries it in ``infotexts``)."""
        try:
            data = json.loads(self.info)
            return "\n".join(data.get("infotexts") or []) or self.info
        except (ValueError, TypeError):
            return self.info

    def pixels(self, i: int = 0) -> bytes:
        """The decoded RGB bytes of image ``i`` (PNG metadata differs with the prompt)."""
        from io import BytesIO

        from PIL import Image

        with Image.open(BytesIO(self.images[i])) as im:
            return im.convert("RGB").tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_ignore(top: str):
    def ignore(d, names):
        out = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if os.path.abspath(d) == top:
            # Forge's own history (the launcher only reads repositories/*'s HEADs), and
            # user state of that checkout
            out |= {n for n in names if n in (".git", "outputs", "tmp", "config.json", "ui-config.json",
                                               "cache.json", "params.txt", "venv")}
            if "extensions" in names:
                out.add("extensions")
        return out

    return ignore


class WebUIHost:
    """One throw-away host copy and its server. See the module docstring."""

    def __init__(self, forge_dir: str, python: str, kind: str = "forge", workdir: Optional[str] = None,
                 install_extension: bool = True, extension_src: str = ROOT, overlay_working_tree: bool = True,
                 sizes: Optional[dict] = None,
                 extra_args: Iterable[str] = (), env: Optional[Dict[str, str]] = None,
                 start_timeout: float = 420.0, request_timeout: float = 600.0):
        self.forge_dir = os.path.abspath(forge_dir)
        self.python = python
        self.kind: HostKind = KINDS[kind]()
        self.own_workdir = workdir is None
        self.workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix=f"webui-{kind}-"))
        self.copy_dir = os.path.join(self.workdir, kind)
        self.data_dir = os.path.join(self.workdir, "data")
        self.models_dir = os.path.join(self.workdir, "models")
        self.log_path = os.path.join(self.workdir, "server.log")
        self.install_extension = install_extension
        self.extension_src = extension_src
        self.overlay_working_tree = overlay_working_tree
        self.sizes = sizes or TINY
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.models: dict = {"checkpoints": {}, "modules": [], "lora": None}
        self.shrunk: List[str] = []
        self.timings: Dict[str, float] = {}
        self._log_fh = None

    # ---- preparation ------------------------------------------------------------------
    def prepare(self, formats: Iterable[str] = ()) -> "WebUIHost":
        t = time.monotonic()
        if not os.path.isdir(self.copy_dir):
            shutil.copytree(self.forge_dir, self.copy_dir, symlinks=True, ignore=_copy_ignore(self.forge_dir))
            os.makedirs(os.path.join(self.copy_dir, "extensions"), exist_ok=True)
            self.shrunk = self.kind.shrink(self.copy_dir, self.sizes)
            with open(os.path.join(self.workdir, "shrunk.txt"), "w") as fh:
                fh.write("\n".join(self.shrunk) + "\n")
        if self.install_extension:
            self._install_extension()
        self.timings["copy+install"] = time.monotonic() - t
        t = time.monotonic()
        self.make_models(formats)
        self.timings["models"] = time.monotonic() - t
        return self

    def _install_extension(self) -> None:
        """``git clone`` of the project, then the working tree's tracked and untracked
        (not ignored) files laid over it, so the test checks the working tree."""
        dest = os.path.join(self.kind.extensions_dir(self.copy_dir, self.data_dir), EXTENSION_NAME)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        subprocess.run(["git", "clone", "-q", self.extension_src, dest], check=True)
        if not self.overlay_working_tree:
            return  # the committed HEAD only
        files = subprocess.run(["git", "-C", self.extension_src, "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], check=True, capture_output=True).stdout.split(b"\0")
        present = set()
        for f in filter(None, (x.decode() for x in files)):
            src = os.path.join(self.extension_src, f)
            if not os.path.lexists(src):
                continue  # deleted in the working tree
            present.add(f)
            target = os.path.join(dest, f)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
        tracked = subprocess.run(["git", "-C", dest, "ls-files", "-z"], check=True,
                                 capture_output=True).stdout.split(b"\0")
        for f in filter(None, (x.decode() for x in tracked)):
            if f not in present:  # tracked in HEAD, deleted in the working tree
                os.remove(os.path.join(dest, f))

    def make_models(self, formats: Iterable[str]) -> dict:
        formats = list(formats)
        cmd = [self.python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_models.py"),
               self.models_dir, json.dumps(self.sizes), *formats]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=self.workdir)
        if r.returncode != 0:
            raise HostError(f"make_models.py failed ({r.returncode})", r.stderr[-6000:])
        made = json.loads(r.stdout.strip().splitlines()[-1])
        self.models["checkpoints"].update(made["checkpoints"])
        self.models["modules"] = made["modules"]
        self.models["lora"] = made["lora"]
        return made

    # ---- names for the API ------------------------------------------------------------
    def checkpoint(self, fmt: str) -> str:
        return os.path.basename(self.models["checkpoints"][fmt])

    def modules(self) -> List[str]:
        return [os.path.basename(p) for p in self.models["modules"]]

    @staticmethod
    def lora_tag(strength: float = 0.8, name: str = LORA_NAME) -> str:
        return f"<lora:{name}:{strength}>"

    # ---- the server -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(k, None)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "PIP_RETRIES": env.get("PIP_RETRIES", "0")})
        env.update(self.kind.env())
        env.update(self.extra_env)
        return env

    def start(self) -> "WebUIHost":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.port = free_port()
        os.makedirs(self.data_dir, exist_ok=True)
        args = self.kind.launch_args(self.port, self.data_dir, self.models_dir) + self.extra_args
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n==== {' '.join(args)}\n".encode())
        self._log_fh.flush()
        t = time.monotonic()
        self.proc = subprocess.Popen([self.python, *args], cwd=self.copy_dir, env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)  # a test run that dies still kills the server
        deadline = t + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise HostError(f"the host exited ({self.proc.returncode}) before answering", self.log_tail())
            try:
                self._request("GET", "/sdapi/v1/options", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, OSError, HostError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HostError(f"the host did not answer within {self.start_timeout:.0f} s", self.log_tail())
            time.sleep(1.0)
        self.timings["start"] = time.monotonic() - t
        return self

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=20)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        self.stop()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "WebUIHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 12000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - n))
                return fh.read().decode("utf8", "replace")
        except OSError:
            return ""

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf8", "replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    # ---- API ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict] = None, timeout: Optional[float] = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf8", "replace")[:4000]
            raise HostError(f"{method} {path}: HTTP {e.code}: {detail}", self.log_tail(6000)) from None

    def options(self) -> dict:
        return self._request("GET", "/sdapi/v1/options")

    def set_options(self, **opts) -> dict:
        """POST /sdapi/v1/options. Forge applies ``forge_unet_storage_dtype`` at the next
        model load only when the checkpoint or the modules change in the same call."""
        self._request("POST", "/sdapi/v1/options", opts)
        return self.options()

    def extensions(self) -> List[dict]:
        """GET /sdapi/v1/extensions: ``[{"name", "enabled", "path", ...}]``."""
        return self._request("GET", "/sdapi/v1/extensions")

    def scripts(self) -> dict:
        """GET /sdapi/v1/scripts: ``{"txt2img": [titles], "img2img": [...]}``."""
        return self._request("GET", "/sdapi/v1/scripts")

    def extension_loaded(self) -> bool:
        """Our extension is listed, enabled, and its always-on script is there."""
        ours = [e for e in self.extensions() if e.get("name") == EXTENSION_NAME]
        return bool(ours and ours[0].get("enabled") and "gguf lora" in self.scripts().get("txt2img", []))

    def refresh(self) -> None:
        self._request("POST", "/sdapi/v1/refresh-checkpoints", {})
        self._request("POST", "/sdapi/v1/refresh-loras", {})

    def txt2img(self, prompt: str = "a photo of a cat", **kw) -> Txt2ImgResult:
        body = dict(prompt=prompt, negative_prompt="", steps=1, width=64, height=64, cfg_scale=1.0,
                    distilled_cfg_scale=3.5, sampler_name="Euler", scheduler="Simple", seed=1234,
                    batch_size=1, n_iter=1, send_images=True, save_images=False)
        body.update(kw)
        t = time.monotonic()
        r = self._request("POST", "/sdapi/v1/txt2img", body)
        dt = time.monotonic() - t
        images = [base64.b64decode(i.split(",", 1)[-1]) for i in (r.get("images") or [])]
        if not images:
            raise HostError("txt2img returned no image", self.log_tail(6000))
        return Txt2ImgResult(images=images, info=r.get("info") or "", parameters=r.get("parameters") or {},
                             seconds=dt, raw={k: v for k, v in r.items() if k != "images"})


def env_host(**kw) -> WebUIHost:
    """A host from the environment: FORGE_DIR, FORGE_PYTHON (default: this interpreter),
    FORGE_KIND (forge|neo), FORGE_WEBUI_EXTENSION=0 for vanilla Forge, FORGE_WEBUI_OVERLAY=0
    to install the committed HEAD without the working tree's changes, FORGE_WEBUI_WORKDIR
    to keep the copy (and its log) at a known place."""
    kw.setdefault("kind", os.environ.get("FORGE_KIND", "forge"))
    kw.setdefault("install_extension", os.environ.get("FORGE_WEBUI_EXTENSION", "1") != "0")
    kw.setdefault("overlay_working_tree", os.environ.get("FORGE_WEBUI_OVERLAY", "1") != "0")
    wd = os.environ.get("FORGE_WEBUI_WORKDIR")
    kw.setdefault("workdir", os.path.join(wd, kw["kind"]) if wd else None)
    forge_dir = kw.pop("forge_dir", None) or os.environ["FORGE_DIR"]
    python = kw.pop("python", None) or os.environ.get("FORGE_PYTHON", sys.executable)
    return WebUIHost(forge_dir, python, **kw)

    
def rss_mb(h: "WebUIHost") -> float:
    """The server's resident memory (MiB): launch.py runs the web UI in its own process."""
    with open(f"/proc/{h.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
