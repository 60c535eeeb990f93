"""Fitted state (encoder weights, RCF kernels, vector transforms) as bytes for the store's
`<table>__state` companion, with a digest that proves a later run uses the same tensors.

The store's one torch module: `ChipStore` imports it only when it reads or writes state, so
opening a table to search or inspect it does not load torch.
"""

from __future__ import annotations

import hashlib
import io

import torch


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def bytes_to_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
