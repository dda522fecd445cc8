"""The correction path of NestedReFTTrainer, checked against numbers computed independently of it:
π_old by a plain forward of the full model, μ by a model rebuilt without the skipped layers, one
row at a time (no padding), and TRL's GRPOTrainer given the weighted advantages."""

import pytest
import torch
from test_skipping import rebuilt_without
from test_trainer import SHARED, dataset, first_inputs, length_reward, loss_and_grads
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from nested_reft.config import NestedReFTConfig
from nested_reft.corrections import correction_weights
from nested_reft.engines import HFEngine
from nested_reft.trainer import NestedReFTTrainer


def row_logps(model, output, temperature, top_k=0):
    """(B, T) log-probs of each completion token, one unpadded row at a time; 0 past the end.
    `top_k` > 0: of top-k sampling, the softmax over the k largest logits, renormalised."""
    p_ids, p_mask = output["prompt_ids"], output["prompt_mask"].bool()
    c_ids, c_mask = output["completion_ids"], output["completion_mask"].bool()
    out = torch.zeros(c_ids.shape)
    with torch.no_grad():
        for i in range(c_ids.size(0)):
            prompt, completion = p_ids[i][p_mask[i]], c_ids[i][c_mask[i]]
            logits = model(torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1 : -1].float() / temperature
            if top_k:
                logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
            lp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            out[i, : len(completion)] = lp
    return out


# float32 end to end: TRL's default bf16 autocast moves π_old by ~3e-3 from the plain forward
FP32 = {**SHARED, "bf16": False}


def make_trainer(model_dir, tokenizer, tmp_path, engine=None, **kwargs):
    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, **{**FP32, **kwargs})
    return NestedReFTTrainer(model=model_dir, reward_funcs=length_reward, processing_class=tokenizer,
                             train_dataset=dataset(), args=args, engine=engine)


def capture_generation_batches(trainer, monkeypatch):
    """The whole generation batch as TRL scored it (unweighted advantages) and as ours returns it."""
    captured = {}
    trl_fn = GRPOTrainer._generate_and_score_completions

    def trl_side(self, inputs):
        out = trl_fn(self, inputs)
        captured["trl_advantages"] = out["advantages"].clone()
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", trl_side)
    ours_fn = trainer._generate_and_score_completions

    def ours_side(inputs):
        out = ours_fn(inputs)
        captured["ours"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
        return out

    trainer._generate_and_score_completions = ours_side
    return captured


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_advantages_are_weighted_by_independent_pi_old_and_mu(small_model_dir, chat_tokenizer, tmp_path,
                                                             monkeypatch, steps_per_generation):
    """Catches a reversed ratio (μ/π_old), a μ scored under another skip set, and π_old taken from a
    padded forward that differs from the plain model."""
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    skip = (2, 3)
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_mode="fixed", skip_layers=list(skip),
                           correction="tis", clip=2.0, steps_per_generation=steps_per_generation,
                           temperature=0.9)
    captured = capture_generation_batches(trainer, monkeypatch)
    first_inputs(trainer)
    out = captured["ours"]
    assert out["completion_ids"].size(0) == 8 * steps_per_generation
    full = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
    old = row_logps(full, out, 0.9)
    mu = row_logps(rebuilt_without(full, skip), out, 0.9)
    mask = out["completion_mask"]
    w = correction_weights(old, mu, mask, "tis", clip=2.0)
    adv = captured["trl_advantages"].unsqueeze(1)
    assert adv.abs().sum() > 0 and (w[mask.bool()] - 1).abs().max() > 0.05  # a real correction is compared
    torch.testing.assert_close(out["advantages"], adv * w, atol=1e-5, rtol=1e-4)
    reversed_w = correction_weights(mu, old, mask, "tis", clip=2.0)
    assert (out["advantages"] - adv * reversed_w).abs().max() > 1e-3  # the test can tell the two apart


def trl_loss_with_weighted_advantages(model_dir, tokenizer, tmp_path, batch, completions, weights, model_state=None,
                                      **kwargs):
    """TRL's loss and gradients on the same batch with advantages × weights (`model_state`: the
    policy's weights at loss time, when they moved after sampling)."""
    theirs = GRPOTrainer(model=model_dir, reward_funcs=length_reward, processing_class=tokenizer,
                         train_dataset=dataset(), args=GRPOConfig(output_dir=str(tmp_path / "trl"), **{**FP32, **kwargs}))
    theirs._generate_single_turn = lambda prompt_ids, *a, **k: ([list(c) for c in completions], None)
    theirs.model.train()
    inputs = theirs._prepare_inputs(batch)
    inputs["advantages"] = inputs["advantages"].unsqueeze(1) * weights
    if model_state is not None:
        theirs.model.load_state_dict(model_state)
    return loss_and_grads(theirs, inputs)


class OwnLogprobEngine(HFEngine):
    """An engine that reports its sampler's μ and holds 'its own' weights, as vLLM does: the
    trainer must compute π_old itself and use the engine's μ."""

    shares_policy_weights = False


@pytest.mark.parametrize("case", ["retrace_lam", "seq_is", "seq_tis_skip", "own_logprobs"])
def test_correction_path_reproduces_trl_with_weighted_advantages(small_model_dir, chat_tokenizer, tmp_path,
                                                                 monkeypatch, case):
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    kwargs = {"retrace_lam": dict(correction="retrace", lam=0.5, skip_ratio=0.0),
              "seq_is": dict(correction="seq_is", skip_ratio=0.0),
              "seq_tis_skip": dict(correction="seq_tis", clip=1.5, skip_mode="fixed", skip_layers=[1, 4]),
              "own_logprobs": dict(correction="tis", skip_ratio=0.0)}[case]
    engine = None
    if case == "own_logprobs":
        policy = AutoModelForCausalLM.from_pretrained(small_model_dir)
        engine = OwnLogprobEngine(policy, chat_tokenizer, eos_token_ids=[chat_tokenizer.eos_token_id])
    ours = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "ours", engine=engine, **kwargs)
    if engine is not None:  # the engine samples from its own copy of the same weights
        engine.model = ours.model
    captured = capture_generation_batches(ours, monkeypatch)
    batch, inputs = first_inputs(ours)
    out = captured["ours"]
    full = AutoModelForCausalLM.from_pretrained(small_model_dir).eval()
    old = row_logps(full, out, 1.0)
    skip = tuple(kwargs.get("skip_layers", ()))
    mu = row_logps(rebuilt_without(full, skip), out, 1.0) if skip else old
    mask = out["completion_mask"]
    expected = correction_weights(old, mu, mask, kwargs["correction"], clip=ours.args.clip, lam=ours.args.lam)
    if case == "retrace_lam":  # the trace at ratio 1: λ^(t+1), so not all ones
        assert expected[0, 2] == pytest.approx(0.125)
    loss_a, grads_a = loss_and_grads(ours, inputs)
    loss_b, grads_b = trl_loss_with_weighted_advantages(small_model_dir, chat_tokenizer, tmp_path, batch,
                                                        [c[m.bool()].tolist() for c, m in zip(out["completion_ids"], mask)],
                                                        expected)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)
