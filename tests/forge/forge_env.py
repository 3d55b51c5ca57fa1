"""What both Forge backend checks share: Forge's backend on the path (with the chosen
``gguf`` package first), and a model loaded as Forge's UI loads one.

Imported first by ``run_forge_check.py`` and ``run_forge_unet_check.py`` (run in an
interpreter that imports Forge's backend, with ``FORGE_DIR`` set).
"""
import os
import sys
import types

FORGE = os.environ["FORGE_DIR"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = sys.argv[1:]
sys.argv = [sys.argv[0], "--always-cpu"]  # Forge parses its arguments on import
sys.path.insert(0, FORGE)
sys.path.insert(1, os.path.join(FORGE, "repositories", "huggingface_guess"))
sys.path.insert(0, ROOT)
WHICH = os.environ.get("FORGE_GGUF", "first-found")
if WHICH == "bundled":  # PyPI gguf absent: Forge's own copy is what ``import gguf`` finds
    sys.path.insert(1, os.path.join(FORGE, "packages_3rdparty"))
elif WHICH == "newest":  # the newest PyPI gguf, installed in $FORGE_GGUF_NEWEST, wins the import
    sys.path.insert(1, os.environ["FORGE_GGUF_NEWEST"])
    sys.path.append(os.path.join(FORGE, "packages_3rdparty"))
else:
    sys.path.append(os.path.join(FORGE, "packages_3rdparty"))


def cpu_patcher(model):
    import torch
    from backend.patcher.base import ModelPatcher

    return ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def load_as_forge_does(path, unet_config, component, cls_name, dtypes):
    """``load_torch_file`` (ours, registered), then Forge's
    ``backend.loader.load_huggingface_component``, which picks the storage dtype
    (``state_dict_dtype``), prints the GGUF statistics (reading ``gguf_cls.__name__``)
    and builds the model with the matching operations; the guess is Forge's, with this
    small model's sizes. Then what Forge's model_load does before any forward: bake,
    and refresh the LoRAs."""
    from backend import loader as bloader, memory_management, utils

    state = utils.load_torch_file(path)
    guess = types.SimpleNamespace(unet_config=dict(unet_config), supported_inference_dtypes=list(dtypes))
    model = bloader.load_huggingface_component(guess, component, "diffusers", cls_name,
                                               os.path.join(FORGE, "backend", "huggingface"), state)
    assert model is not None, f"Forge's loader skipped the {component}"
    memory_management.bake_gguf_model(model)
    cpu_patcher(model).refresh_loras()
    return model


def snapshot(model):
    """Every parameter's bytes (or values) and format, to compare after a LoRA is removed."""
    return {k: (p.data.clone(), getattr(getattr(p, "gguf_cls", None), "name", None))
            for k, p in model.named_parameters()}


def removal_restores(patcher, model, before, base, run) -> dict:
    """Remove every LoRA (Forge's refresh with no patches): the same bytes and formats as
    ``before`` (a :func:`snapshot`), and the same output as ``base``."""
    import torch

    patcher.lora_patches = {}
    patcher.refresh_loras()
    after = snapshot(model)
    return {"bytes_restored": all(torch.equal(before[k][0], after[k][0]) and before[k][1] == after[k][1]
                                  for k in before),
            "base_restored": bool(torch.equal(run(model), base))}


def failure(e: BaseException) -> dict:
    """A format's failure as a result line: reported, not raised (one line per format)."""
    import traceback

    return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
