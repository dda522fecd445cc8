"""Dequantization throughput of the Triton PoT kernel against the uniform-INT kernel.

    python -m benchmarks.pot_dequant [--bits 2 3 4] [--out outputs/benchmarks/pot_dequant.json]

On a CUDA GPU: for weight matrices of real models (4096×4096 up to 14336×4096, [out, in]), the
median time of each kernel (`triton.testing.do_bench`, best of a few block shapes per kernel),
GB/s of fp16 produced (out·in·2 bytes / time) and the ratio t_INT / t_PoT, all from one run;
each output is first checked bit for bit against the torch reference.

Without a GPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on small shapes
for CORRECTNESS ONLY; interpreter timings say nothing about GPU speed, so none are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from reft_kernels.pot.format import grouped, max_exponent
from reft_kernels.pot.reference import (
    int_dequantize,
    int_quantize_rtn,
    pot_dequantize,
    pot_quantize,
)

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
CPU_SHAPES = [(64, 256), (33, 300), (128, 512)]
BLOCKS = [(8, 256), (16, 128), (16, 256), (32, 128), (4, 512)]


def make_weights(n: int, k: int, bits: int, group_size: int, device):
    w = torch.randn(n, k, device=device) * 0.02
    wg, _ = grouped(w, group_size)
    s0 = wg.abs().amax(-1) / 2 ** max_exponent(bits)  # the plain max scale: speed does not depend on it
    return pot_quantize(w, s0, bits, group_size), int_quantize_rtn(w, bits, group_size)


def same_bits(a, b) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--out", default="outputs/benchmarks/pot_dequant.json")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first jitted
    import triton

    from reft_kernels.pot.triton_dequant import int_dequantize_triton, pot_dequantize_triton

    device = torch.device("cuda" if gpu else "cpu")
    mode = "gpu" if gpu else "cpu-interpreter (correctness only, no timings)"
    rows = []
    for bits in a.bits:
        for n, k in (GPU_SHAPES if gpu else CPU_SHAPES):
            torch.manual_seed(n + k + bits)
            pq, iq = make_weights(n, k, bits, a.group_size, device)
            pot_ok = same_bits(pot_dequantize_triton(pq), pot_dequantize(pq))
            int_ok = same_bits(int_dequantize_triton(iq), int_dequantize(iq))
            row = {"bits": bits, "out": n, "in": k, "pot_exact": pot_ok, "int_exact": int_ok}
            if gpu:
                out = torch.empty(n, k, dtype=torch.float16, device=device)
                best = {}
                for name, fn, q in (("pot", pot_dequantize_triton, pq), ("int", int_dequantize_triton, iq)):
                    times = {blk: triton.testing.do_bench(lambda fn=fn, q=q, blk=blk, out=out: fn(q, out, *blk))
                             for blk in BLOCKS}
                    blk = min(times, key=times.get)
                    best[name] = (times[blk], blk)
                produced = n * k * 2  # bytes of fp16
                row.update(pot_ms=best["pot"][0], int_ms=best["int"][0], pot_block=best["pot"][1],
                           int_block=best["int"][1], pot_gbs=produced / best["pot"][0] / 1e6,
                           int_gbs=produced / best["int"][0] / 1e6,
                           ratio_int_over_pot=best["int"][0] / best["pot"][0])
            rows.append(row)
            print(row, flush=True)
    result = {"mode": mode, "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "group_size": a.group_size, "rows": rows}
    print(f"\nPoT vs INT dequantization — {mode}, {result['device']}\n")
    if gpu:
        print("| bits | out × in | PoT GB/s | INT GB/s | INT time / PoT time | exact |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['bits']} | {r['out']}×{r['in']} | {r['pot_gbs']:.0f} | {r['int_gbs']:.0f} | "
                  f"{r['ratio_int_over_pot']:.2f}× | {r['pot_exact'] and r['int_exact']} |")
    else:
        print("No GPU: the Triton interpreter checked the kernels against the torch reference;"
              " throughput is still to be measured on a GPU.\n")
        print("| bits | out × in | PoT == reference | INT == reference |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['bits']} | {r['out']}×{r['in']} | {r['pot_exact']} | {r['int_exact']} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    if not all(r["pot_exact"] and r["int_exact"] for r in rows):
        raise SystemExit("a kernel disagreed with the torch reference")
    return result


if __name__ == "__main__":
    main()
