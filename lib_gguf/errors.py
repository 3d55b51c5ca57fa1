"""The one error class for bad GGUF input, and its relatives."""
from __future__ import annotations


class GGUFFormatError(ValueError):
    """A GGUF file, tensor or format we cannot read or write.

    The message always names what was wrong and where: the file, the tensor, the
    type id or the field, and what was expected instead.
    """

    def __init__(self, message: str, *, path=None, tensor: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {str(path)!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.path = path
        self.tensor = tensor


class UnsupportedFormatError(GGUFFormatError):
    """A known GGML type that this operation cannot handle (for example a
    format we cannot quantize, or one that needs an importance matrix)."""


class GGUFOperationError(TypeError):
    """A torch operation that cannot run on a :class:`~lib_gguf.parameter.GGUFParameter`'s
    bytes (an in-place change, an integer view, float values copied into it). The
    message names the weight (format, logical shape) and says what to call instead."""


class OutputPathError(GGUFFormatError):
    """An output path we refuse before doing any work: it is one of the inputs, a
    folder, in a folder we cannot write, or on a disk without room for it."""
