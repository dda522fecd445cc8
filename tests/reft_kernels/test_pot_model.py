"""PoTLinear, refinement, quantize_model on a small Qwen2, save / load, generate()."""

import copy

import pytest
import torch

from reft_kernels.pot.format import clamp_pot_scales
from reft_kernels.pot.linear import PoTLinear
from reft_kernels.pot.quantize import (
    _set_module,
    capture_hessians,
    int_rtn_fake_quantize,
    load_quantized,
    quantize_model,
    save_quantized,
    split_calibration,
    target_linears,
)
from reft_kernels.pot.reference import pot_dequantize, pot_fake_quant, pot_quantize
from reft_kernels.pot.refine import refine_layer_scales, refine_model_scales, ste_pot_weight
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


def test_ste_forward_uses_the_stored_fp16_scale_and_linear_rounding():
    torch.manual_seed(2)
    w = torch.randn(4, 16)
    s = grid_search_scales(w, 3, 8, rounding="linear").float() * (1 + 1e-4)  # between fp16 numbers
    wq = ste_pot_weight(w, s, 3, 8, "linear")
    assert torch.equal(wq, pot_dequantize(pot_quantize(w, s, 3, 8, "linear")).float())
    assert not torch.equal(wq, pot_fake_quant(w, s, 3, 8, "linear"))  # fp32 scales would differ


def test_split_calibration_holds_out_every_kth_batch():
    batches = [torch.full((1, 2), i) for i in range(10)]
    train, val = split_calibration(batches, 0.25)
    assert [int(b[0, 0]) for b in val] == [3, 7] and [int(b[0, 0]) for b in train] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert split_calibration(batches[:1], 0.25) == (batches[:1], batches[:1])
    assert split_calibration(batches[:3], 0.125)[1] == [batches[2]]  # at least one held out
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_calibration(batches, 1.0)


def _kl(fp, q, batches):
    tot, n = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            t = torch.log_softmax(fp(input_ids=ids).logits.float(), -1)
            p = torch.log_softmax(q(input_ids=ids).logits.float(), -1)
            tot += (t.exp() * (t - p)).sum(-1).mean().item() * ids.numel()
            n += ids.numel()
    return tot / n


def test_model_refinement_lowers_the_kl_of_the_stored_model(small_qwen2):
    """End-to-end refinement: the reported held-out KLs are those of the stored PoT models."""
    fp = copy.deepcopy(small_qwen2).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, fp.config.vocab_size, (4, 16), generator=g) for _ in range(5)]
    train, val = batches[:4], batches[4:]
    linears = target_linears(fp)
    init = {n: grid_search_scales(m.weight.float(), 3, 32) for n, m in linears.items()}
    new, stats = refine_model_scales(fp, linears, init, train, 3, 32, steps=40, lr=3e-3, lam=0.0,
                                     val_batches=val, eval_every=10)
    assert len(stats["val_kl_history"]) == 5 and stats["val_kl_history"][0] == stats["init_kl"]
    assert stats["refined_kl"] == min(stats["val_kl_history"]) < 0.9 * stats["init_kl"]

    def stored(scales):
        q = copy.deepcopy(fp)
        for n, m in linears.items():
            _set_module(q, n, PoTLinear.from_linear(m, 3, 32, scales[n], backend="torch"))
        return q

    assert _kl(fp, stored(init), val) == pytest.approx(stats["init_kl"], rel=1e-4)
    assert _kl(fp, stored(new), val) == pytest.approx(stats["refined_kl"], rel=1e-4)
    # quantize_model(granularity="model") is the same computation on its own train/val split
    calib = [torch.randint(0, fp.config.vocab_size, (4, 16), generator=g) for _ in range(4)]
    qm = quantize_model(copy.deepcopy(fp), 3, 32, calib_data=calib, granularity="model", steps=20, lr=3e-3,
                        calib_batch_size=4, val_fraction=0.25, eval_every=10, progress=False)
    st = qm.pot_quantization["stats"]["model"]
    assert qm.pot_quantization["granularity"] == "model" and st["refined_kl"] <= st["init_kl"]
    assert _kl(fp, qm, calib[3:]) == pytest.approx(st["refined_kl"], rel=1e-4)


def test_sequential_layer_refinement_calibrates_on_the_quantized_prefix(small_qwen2):
    fp = copy.deepcopy(small_qwen2).eval()
    calib = _calib(fp)
    kw = dict(calib_data=calib, granularity="layer", steps=10, lr=3e-3, progress=False)
    seq = quantize_model(copy.deepcopy(fp), 3, 32, sequential=True, **kw)
    par = quantize_model(copy.deepcopy(fp), 3, 32, **kw)
    s_seq, s_par = seq.pot_quantization["stats"], par.pot_quantization["stats"]
    assert seq.pot_quantization["sequential"] and not par.pot_quantization["sequential"]
    first = [n for n in s_seq if n.startswith("model.layers.0.")]
    assert first and all(s_seq[n] == s_par[n] for n in first)  # block 0 sees the same inputs
    # block 1's Hessian comes from the model whose block 0 is quantized (as `seq` stores it)
    prefix = copy.deepcopy(fp)
    for n in first:
        _set_module(prefix, n, copy.deepcopy(seq.get_submodule(n)))
    name = "model.layers.1.mlp.down_proj"
    lin = fp.get_submodule(name)
    h = capture_hessians(prefix, {name: prefix.get_submodule(name)}, [calib], 8, False)[name]
    with torch.enable_grad():
        want, st = refine_layer_scales(lin.weight, h, grid_search_scales(lin.weight.float(), 3, 32), 3, 32,
                                       10, 3e-3, 1e-4)
    assert st == s_seq[name] and st != s_par[name]
    assert torch.equal(seq.get_submodule(name).scales, clamp_pot_scales(want, 3))
