"""Fitted state (encoder weights, RCF kernels, vector transforms) as the store keeps it: the
tensors serialised with `torch.save`, and a digest of the tensors themselves, so a later run
proves it uses exactly the tensors the table was written with."""

from __future__ import annotations

import hashlib
import io

import torch

from chipscout.indexer.errors import StoreError
from chipscout.indexer.store import ChipStore, FittedState


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


def encode_state(state: dict[str, torch.Tensor]) -> FittedState:
    return FittedState(tensors_to_bytes(state), state_digest(state))


def save_state(store: ChipStore, key: str, state: dict[str, torch.Tensor]) -> str:
    """Keep `state` under `key` beside `store`'s table; returns its digest."""
    encoded = encode_state(state)
    store.put_fitted_state(key, encoded)
    return encoded.sha256


def load_state(store: ChipStore, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors kept under `key` (None when there are none), checked against their digest."""
    stored = store.fitted_state(key)
    if stored is None:
        return None
    state = bytes_to_tensors(stored.blob)
    if state_digest(state) != stored.sha256:
        raise StoreError(f"stored state {key!r} of table {store.table_name!r} is corrupt (digest mismatch)")
    return state
