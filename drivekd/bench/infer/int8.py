"""Int8 dynamic quantisation (CPU) for the `-int8` variant, and the size of a model's weights.

Preparing a model rather than timing it; `weights_mb` is here because it must count packed int8 weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from drivekd.errors import DriveKDError


def quantize_int8(backend: Any) -> Any:
    """Int8 dynamic quantisation of every `nn.Linear` (weights int8, activations quantised per batch).

    CPU only. Replaces `backend.model` in place and returns the backend. Uses
    `torch.ao.quantization.quantize_dynamic` (deprecated in torch 2.13 in favour of torchao, still
    working); the first quantised engine among the current one, x86, fbgemm, qnnpack that runs a
    smoke test is used, and recorded as `backend.int8_engine`.
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise DriveKDError(
            f"int8: torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic ({e})"
        ) from e
    if backend.device.type != "cpu":
        raise DriveKDError(f"int8: dynamic quantisation runs on CPU only, the model is on {backend.device}")
    if backend.model.dtype != torch.float32:
        raise DriveKDError(f"int8: dynamic quantisation needs a float32 model, not {backend.model.dtype}")
    engine = _pick_engine(quantize_dynamic)
    backend.model.eval()
    with _quiet():
        backend.model = quantize_dynamic(backend.model, {torch.nn.Linear}, dtype=torch.qint8)
    backend.int8_engine = engine
    return backend


def _pick_engine(quantize_dynamic: Any) -> str:
    """Select (and leave selected: modules run with the engine that packed them) a working engine."""
    supported = torch.backends.quantized.supported_engines
    old = torch.backends.quantized.engine
    errors = []
    for engine in dict.fromkeys(e for e in (old, "x86", "fbgemm", "qnnpack") if e in supported and e != "none"):
        try:
            torch.backends.quantized.engine = engine
            with _quiet():
                probe = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 8)), {torch.nn.Linear}, torch.qint8)
                probe(torch.randn(2, 8))
            return engine
        except Exception as e:  # an engine that is compiled in but unusable on this CPU
            errors.append(f"{engine}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    torch.backends.quantized.engine = old
    raise DriveKDError(f"int8: no quantised engine works here ({'; '.join(errors) or 'none supported'})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        yield


def is_int8(model: torch.nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return any(isinstance(m, QLinear) for m in model.modules())


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes of the state dict (shared tensors once, int8 packed weights at one byte each), in MB."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return 0
        key = value.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.numel() * value.element_size()

    with _quiet():
        return sum(size(v) for v in model.state_dict().values()) / 2**20
