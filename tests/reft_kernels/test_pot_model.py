"""PoTLinear, refinement, quantize_model on a small Qwen2, save / load, generate()."""

import copy

import pytest
import torch

from reft_kernels.pot.linear import PoTLinear
from reft_kernels.pot.quantize import (
    int_rtn_fake_quantize,
    load_quantized,
    quantize_model,
    save_quantized,
    target_linears,
)
from reft_kernels.pot.reference import pot_dequantize, pot_fake_quant, pot_quantize
from reft_kernels.pot.refine import refine_layer_scales, ste_pot_weight
from reft_kernels.pot.search import grid_search_scales


def test_potlinear_forward_is_dequantized_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 12, bias=True)
    q = PoTLinear.from_linear(lin, bits=4, group_size=64)
    s = grid_search_scales(lin.weight.float(), 4, 64)
    w16 = pot_dequantize(pot_quantize(lin.weight.float(), s, 4, 64))
    x = torch.randn(3, 5, 200)
    assert torch.equal(q.dequantized_weight(), w16)
    torch.testing.assert_close(q(x), x @ w16.float().T + lin.bias, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        PoTLinear(8, 8, 3, backend="cuda")


def test_potlinear_triton_backend_matches_torch(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    lin = torch.nn.Linear(96, 10)
    a = PoTLinear.from_linear(lin, 3, 32, backend="torch")
    b = PoTLinear.from_linear(lin, 3, 32, backend="triton")
    assert torch.equal(a.dequantized_weight().view(torch.int16), b.dequantized_weight().view(torch.int16))


def test_ste_forward_is_the_quantizer_and_gradient_is_lsq_rule():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    s = grid_search_scales(w, 3, 8).float().requires_grad_(True)
    wq = ste_pot_weight(w, s, 3, 8)
    assert torch.equal(wq.detach(), pot_fake_quant(w, s.detach(), 3, 8))
    wq.sum().backward()
    # dW~/ds = Q(x) - x inside the range, Q(x) outside; summed over each group
    x = w / s.detach().repeat_interleave(8, 1)
    q = pot_fake_quant(w, s.detach(), 3, 8) / s.detach().repeat_interleave(8, 1)
    e_raw = torch.round(torch.log2(x.abs()))
    inside = (e_raw >= 0) & (e_raw <= 3)
    want = torch.where(inside, q - x, q).reshape(4, 2, 8).sum(-1)
    torch.testing.assert_close(s.grad, want)


def test_layer_refinement_lowers_the_output_error():
    """From scales 30% too large, Adam on Γ through the STE recovers most of the output error;
    the reported errors are the exact output errors of the stored (fp16-scale) weights' model."""
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    x = torch.randn(2048, 128) * torch.linspace(0.1, 3, 128)  # uneven input channels
    h = x.T @ x / len(x)
    s0 = (grid_search_scales(w, 3, 64).float() * 1.3).half()
    s1, stats = refine_layer_scales(w, h, s0, 3, 64, steps=150, lr=3e-3, lam=0.0)

    def out_err(s):
        wq = pot_dequantize(pot_quantize(w, s, 3, 64)).float()
        return (((x @ (w - wq).T) ** 2).sum() / ((x @ w.T) ** 2).sum()).item()

    assert stats["init_rel_err"] == pytest.approx(out_err(s0), rel=1e-3)
    assert stats["refined_rel_err"] == pytest.approx(out_err(s1), rel=0.05)
    assert stats["refined_rel_err"] < 0.7 * stats["init_rel_err"]


def test_layer_refinement_never_returns_worse_scales():
    torch.manual_seed(1)
    w = torch.randn(16, 64) * 0.05
    h = torch.eye(64)
    s0 = grid_search_scales(w, 3, 64)  # already the weight-MSE optimum on the grid: H = I
    _, stats = refine_layer_scales(w, h, s0, 3, 64, steps=50, lr=1e-1, lam=0.0)
    assert stats["refined_rel_err"] <= stats["init_rel_err"]


def _calib(model, n=8, length=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=g)


def _ppl_proxy(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_quantize_model_replaces_linears_and_refinement_helps(small_qwen2, granularity):
    fp = copy.deepcopy(small_qwen2).eval()
    names = sorted(target_linears(fp))
    calib = _calib(fp)
    init = quantize_model(copy.deepcopy(fp), 3, 32, refine=False, progress=False)
    ref = quantize_model(copy.deepcopy(fp), 3, 32, calib_data=calib, granularity=granularity,
                         steps=30, lr=3e-3, progress=False)
    for m in (init, ref):
        assert sorted(n for n, mod in m.named_modules() if isinstance(mod, PoTLinear)) == names
        assert isinstance(m.lm_head, torch.nn.Linear) and not any(
            isinstance(mod, torch.nn.Linear) and not isinstance(mod, PoTLinear) and n != "lm_head"
            for n, mod in m.named_modules())
    stats = ref.pot_quantization["stats"]
    assert all(v["refined_rel_err"] <= v["init_rel_err"] for v in stats.values())
    assert sum(v["refined_rel_err"] for v in stats.values()) < sum(v["init_rel_err"] for v in stats.values())
    # the model's own parameters are left as they were (no gradients, same requires_grad)
    assert all(p.requires_grad for p in ref.parameters()) and all(p.grad is None for p in ref.parameters())


def test_quantize_model_errors_name_the_bad_value(small_qwen2):
    with pytest.raises(ValueError, match="refine=True needs calib_data"):
        quantize_model(small_qwen2, 3, 32, progress=False)
    with pytest.raises(ValueError, match="granularity must be one of .* got 'row'"):
        quantize_model(small_qwen2, 3, 32, refine=False, granularity="row", progress=False)
    with pytest.raises(ValueError, match="bits must be one of .* got 8"):
        quantize_model(small_qwen2, 8, 32, refine=False, progress=False)


def test_int_rtn_baseline_changes_only_target_weights(small_qwen2):
    fp = copy.deepcopy(small_qwen2)
    q = int_rtn_fake_quantize(small_qwen2, 3, 32)
    assert torch.equal(q.lm_head.weight, fp.lm_head.weight)
    w0, w1 = fp.model.layers[0].mlp.up_proj.weight, q.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() < w0.abs().max() / 4
    assert w1.reshape(w1.shape[0], -1, 32)[0, 0].unique().numel() <= 8


def test_save_load_round_trip_and_generate(small_qwen2, tmp_path):
    q = quantize_model(small_qwen2, 4, 32, refine=False, progress=False)
    ids = _calib(q, 2, 12)
    save_quantized(q, tmp_path / "pot")
    loaded = load_quantized(tmp_path / "pot")
    for (n, a), (_, b) in zip(q.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, loaded(input_ids=ids).logits)
    out = loaded.generate(input_ids=ids[:, :4], max_new_tokens=6, do_sample=False,
                          pad_token_id=loaded.config.pad_token_id)
    ref = q.generate(input_ids=ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=q.config.pad_token_id)
    assert out.shape == (2, 10) and torch.equal(out, ref)
    with pytest.raises(FileNotFoundError, match="not a PoT checkpoint"):
        load_quantized(tmp_path)
