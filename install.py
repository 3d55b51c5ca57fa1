"""Forge's install hook for forge-gguf-lora.

Forge (and AUTOMATIC1111's launcher) runs ``python install.py`` once per start
with its ``launch`` module importable; ``launch.is_installed(name)`` and
``launch.run_pip(args, desc)`` are the only things used here.

What it installs, and what it never installs:

- ``safetensors`` and ``tqdm``, and only when missing (Forge already ships both,
  so on a normal Forge this does nothing). Nothing is ever upgraded, downgraded
  or pinned: a package Forge installed is left as it is.
- never PyPI's ``gguf``: Forge bundles its own modified copy in
  ``packages_3rdparty/gguf`` (put at the *end* of ``sys.path``), and a PyPI
  ``gguf`` in site-packages would win ``import gguf`` and break Forge's own GGUF
  support (``type object 'Q8_0' has no attribute 'bake'``). This extension reads
  and writes GGUF with its own code (``lib_gguf.reader`` / ``lib_gguf.writer``)
  and works with either ``gguf`` behind the import, so it needs none.
- never torch, numpy or gradio: they are Forge's, at Forge's versions.
- not ``numba`` either: it makes the CPU quantizers (the converter, merged LoRAs)
  and the CPU dequantizers (every quantized format but Q1_0 and Q8_K) several
  times faster, but it is optional (``lib_gguf`` falls back to its torch
  kernels), large (llvmlite) and pins a numpy range, so adding it to Forge's
  environment is the user's choice (``pip install numba``; see the README).
"""
from __future__ import annotations

# (name for launch.is_installed, pip requirement): only what Forge might lack.
REQUIREMENTS = (
    ("safetensors", "safetensors"),
    ("tqdm", "tqdm"),
)

# Never installed from here, whatever is missing (see the module docstring).
NEVER_INSTALL = frozenset({"gguf", "torch", "numpy", "gradio"})


def missing(launch) -> list:
    """The requirements ``launch.is_installed`` says are missing."""
    return [req for name, req in REQUIREMENTS if not launch.is_installed(name)]


def main(launch=None) -> list:
    """Install what is missing; returns the requirements it asked pip for."""
    if launch is None:
        import launch  # Forge's launcher module
    done = []
    for req in missing(launch):
        if req in NEVER_INSTALL:  # a guard against a future edit of REQUIREMENTS
            continue
        launch.run_pip(f"install {req}", f"{req} for forge-gguf-lora")
        done.append(req)
    return done


if __name__ == "__main__":
    main()
