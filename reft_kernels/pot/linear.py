"""`PoTLinear`: a linear layer that stores PoT codes + fp16 scales and dequantizes on the fly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .format import check_bits, check_group_size, codes_per_word, num_groups
from .reference import PoTWeight, check_rounding, pot_dequantize, pot_quantize
from .search import grid_search_scales

BACKENDS = ("auto", "torch", "triton")


class PoTLinear(nn.Module):
    """y = x W~^T + b with W~ = dequantize(packed codes, fp16 scales), held as buffers.

    backend: "torch" (the reference), "triton" (the kernel; CUDA, or CPU under
    TRITON_INTERPRET=1) or "auto" = "triton" for CUDA weights, "torch" otherwise. Both give the
    same fp16 weight bit for bit (tests/reft_kernels), so "auto" changes speed, not results.
    The fp16 weight is cast to the input's dtype before the matmul. `rounding` is the encoder's
    rule for choosing codes in `set_weight` (see `reference.round_exponent`); it does not affect
    the stored format or the dequantization.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 bias: bool = False, device=None, backend: str = "auto", rounding: str = "log2"):
        super().__init__()
        check_bits(bits)
        check_group_size(group_size)
        self.rounding = check_rounding(rounding)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        n_words = math.ceil(in_features / codes_per_word(bits))
        self.register_buffer("packed", torch.zeros(out_features, n_words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, num_groups(in_features, group_size),
                                                  dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    scales: torch.Tensor | None = None, backend: str = "auto", rounding: str = "log2",
                    weight: torch.Tensor | None = None) -> PoTLinear:
        """Quantize `linear.weight` (or `weight`, e.g. one already on the PoT grid chosen by another
        encoder) with the given scales (default: grid-search initialisation)."""
        w = (linear.weight if weight is None else weight).detach().float()
        if scales is None:
            scales = grid_search_scales(w, bits, group_size, rounding=rounding)
        mod = cls(linear.in_features, linear.out_features, bits, group_size,
                  bias=linear.bias is not None, device=w.device, backend=backend, rounding=rounding)
        mod.set_weight(w, scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor, scales: torch.Tensor) -> None:
        """Re-quantize in place from a float weight [out, in] and per-group scales."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit PoTLinear "
                             f"[{self.out_features}, {self.in_features}]")
        q = pot_quantize(w.float(), scales, self.bits, self.group_size, self.rounding)
        self.packed.copy_(q.packed)
        self.scales.copy_(q.scales)

    def quantized_weight(self) -> PoTWeight:
        return PoTWeight(self.packed, self.scales, self.bits, self.group_size, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        backend = self.backend
        if backend == "auto":
            backend = "triton" if self.packed.is_cuda else "torch"
        if backend == "triton":
            from .triton_dequant import pot_dequantize_triton

            return pot_dequantize_triton(self.quantized_weight())
        return pot_dequantize(self.quantized_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")
