"""What a failed run means: bad input (``ValidationError``, the field and the value named), out of memory (with
advice per device) or a GPU that cannot run these kernels (the one case that moves a session to the CPU). Pure
functions of the exception."""
from __future__ import annotations

from typing import Any


class ValidationError(ValueError):
    """Bad user input. ``field`` and ``value`` say exactly what was wrong."""

    def __init__(self, field_name: str, value: Any, problem: str):
        self.field = field_name
        self.value = value
        self.problem = problem
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field_name}: {problem} (got {shown})")



# cuBLAS/cuDNN report a failed workspace allocation under their own names: out of memory, not a broken GPU.
ALLOC_FAILED_MARKERS = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed",
                        "cudnn_status_alloc_failed")
# Only errors that mean "this GPU cannot run these kernels" (a PyTorch build without the GPU's arch, an
# unsupported operation) justify moving the session to the CPU; any other CUDA error is reported as it is.
GPU_UNSUPPORTED_MARKERS = ("no kernel image is available", "invalid device function", "arch_mismatch",
                           "cublas_status_not_supported", "cudnn_status_not_supported")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError (or a cuBLAS/cuDNN ALLOC_FAILED); the CPU allocator MemoryError or a
    RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in ALLOC_FAILED_MARKERS)


def is_gpu_failure(exc: BaseException) -> bool:
    """The GPU cannot run these kernels (see GPU_UNSUPPORTED_MARKERS); out-of-memory errors never count."""
    return (isinstance(exc, RuntimeError) and not is_out_of_memory(exc)
            and any(m in str(exc).lower() for m in GPU_UNSUPPORTED_MARKERS))


def memory_advice(device: str) -> str:
    if device == "cuda":
        return ("try a smaller size, --offload model (or sequential), or --attention sliced; "
                "close other programs using the GPU")
    return "try a smaller size, close other programs, or use --precision bf16 to halve the weights"


class ModelLoadError(RuntimeError):
    """A model (or what loads beside it: the tiny decoder) could not be loaded. The message is meant for the user as
    it is. Here, below the planning, so that a unit's ``loaded`` can raise it; ``models`` re-exports it."""
