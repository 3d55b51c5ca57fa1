"""lib_lora's error: names the LoRA file and key, and what was expected."""
from __future__ import annotations


class LoraError(ValueError):
    def __init__(self, message: str, *, path=None, key: str | None = None):
        where = []
        if path is not None:
            where.append(f"LoRA {str(path)!r}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__((", ".join(where) + ": " if where else "") + message)
        self.path = path
        self.key = key
