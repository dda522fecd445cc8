"""Gated linear attention ops (SPEC.md §9), in flash-linear-attention's GLA layout, heads first.

- `recurrent`: `recurrent_gla`, a plain loop over time (the reference), and `decode_gla`, one step
- `chunked`: `chunked_gla`, parallel inside chunks and recurrent across them (training)
- `triton_chunk`: `triton_chunked_gla`, a Triton kernel for the chunked forward (key-axis gate)
- `fla_path`: `fla_chunked_gla`, flash-linear-attention's chunk kernels (GPU, optional)
"""

from .chunked import DEFAULT_CHUNK_SIZE, chunked_gla
from .fla_path import fla_chunked_gla
from .recurrent import accumulator_dtype, decode_gla, recurrent_gla
from .triton_chunk import triton_chunked_gla

__all__ = [
    "DEFAULT_CHUNK_SIZE", "accumulator_dtype", "chunked_gla", "decode_gla", "fla_chunked_gla",
    "recurrent_gla", "triton_chunked_gla",
]
