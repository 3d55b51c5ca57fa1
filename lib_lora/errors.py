"""lib_lora's error: names the LoRA file and key, and what was expected."""
from __future__ import annotations


class LoraError(ValueError):
    def __init__(self, message: str, *, path=None, key: str | None = None):
        places = ([f"LoRA {str(path)!r}"] if path is not None else []) + ([f"key {key!r}"] if key is not None else [])
        super().__init__(f"{', '.join(places)}: {message}" if places else message)
        self.path = path
        self.key = key
