"""Float32 views of a stored direction tensor e, for the torch path's ops that read it whole
(decode's matmuls, restore).

On a CPU a half-precision e is upcast chunk by chunk along S into one reused float32 buffer:
a float32 copy of the whole of e, fresh at every call, costs more there (page faults of new
memory, twice the bytes) than the op that reads it.
"""

from __future__ import annotations

import torch

# float32 bytes upcast at a time: [B, H, chunk, D], but never fewer tokens than MIN_TOKENS
# (a large B * H * D would otherwise make one small matmul per token).
UPCAST_BYTES = 1 << 21
MIN_TOKENS = 32


def upcast_chunks(e: torch.Tensor):
    """Yield (slice of S, float32 `[B, H, s, D]`) over e `[B, H, S, D]`.

    The whole of e in one piece when it is float32 (e itself, no copy) or not on a CPU (one
    upcast copy); else chunks of S, each upcast into the same buffer, which the caller may
    overwrite but must not keep past the next step (`chunked(e)` tells which case applies).
    """
    B, H, S, D = e.shape
    if not chunked(e):
        yield slice(0, S), e.to(torch.float32)
        return
    step = max(MIN_TOKENS, UPCAST_BYTES // (4 * B * H * D))
    buf = torch.empty((B, H, min(step, S), D), dtype=torch.float32, device=e.device)
    for s0 in range(0, S, step):
        n = min(S, s0 + step) - s0
        yield slice(s0, s0 + n), buf[:, :, :n].copy_(e[:, :, s0:s0 + n])


def chunked(e: torch.Tensor) -> bool:
    """True when `upcast_chunks(e)` yields reused float32 buffers (a non-empty half-precision e
    on a CPU)."""
    return e.dtype != torch.float32 and e.device.type == "cpu" and e.numel() > 0
