"""flash-linear-attention's chunked GLA kernels (`fla.ops.gla.chunk_gla`, forward and backward) behind
our heads-first layout: an optional GPU path, tested against `chunked_gla` where CUDA is present."""

from __future__ import annotations

from .recurrent import _check


def fla_chunked_gla(q, k, v, gk, scale: float | None = None, initial_state=None):
    """o (B, H, T, Dv) and the final state (B, H, Dk, Dv, float32) from fla's `chunk_gla`."""
    _check(q, k, v, gk, None, initial_state)
    if gk is None:
        raise ValueError("fla's chunk_gla takes a key-axis gate gk")
    if q.device.type != "cuda":
        raise RuntimeError(f"fla's chunk_gla runs on CUDA tensors, got a tensor on {q.device}; "
                           "use gla_backend='torch' on CPU")
    try:
        from fla.ops.gla import chunk_gla
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("gla_backend='fla' needs flash-linear-attention: pip install fla-core==0.6.0") from e
    scale = q.size(-1) ** -0.5 if scale is None else scale
    q, k, v, gk = (x.transpose(1, 2) for x in (q, k, v, gk))  # fla: (B, T, H, D)
    h0 = None if initial_state is None else initial_state.float()
    o, ht = chunk_gla(q, k, v, gk, scale=scale, initial_state=h0, output_final_state=True)
    return o.transpose(1, 2), ht
