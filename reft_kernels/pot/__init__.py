"""Power-of-two (PoT) weight quantization (SPEC.md §10): format, torch reference, Triton kernels.

- `format`: codes, packing into int32 words, groups, fp16 scale limits
- `reference`: `pot_quantize` / `pot_dequantize` and the uniform-INT baseline, in plain torch
- `search`: step 1, grid-search scale initialisation
- `triton_dequant`: Triton dequantization kernels (PoT without multiply; INT baseline)
"""

from .format import SUPPORTED_BITS, max_exponent, pack_codes, unpack_codes
from .reference import (
    IntWeight,
    PoTWeight,
    int_dequantize,
    int_quantize_rtn,
    pot_dequantize,
    pot_fake_quant,
    pot_quantize,
)
from .search import grid_search_scales, quantize_pot_init

__all__ = [
    "SUPPORTED_BITS", "max_exponent", "pack_codes", "unpack_codes", "IntWeight", "PoTWeight",
    "int_dequantize", "int_quantize_rtn", "pot_dequantize", "pot_fake_quant", "pot_quantize",
    "grid_search_scales", "quantize_pot_init",
]
