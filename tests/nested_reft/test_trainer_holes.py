"""Numbers that used to be wrong without an error: non-finite μ, LoRA dropout in π_old, a backbone's
auxiliary loss dropped by TRL's fused LM head, and a round buffer loaded by unpickling."""

import json
import os

import pytest
import torch
from test_trainer import dataset, first_inputs, length_reward, loss_and_grads
from test_trainer_correction import FP32, OwnLogprobEngine, make_trainer

from nested_reft.config import NestedReFTConfig
from nested_reft.round_buffer import load_round_buffer, save_round_buffer
from nested_reft.trainer import NestedReFTTrainer


class NaNEngine(OwnLogprobEngine):
    """A behavior engine whose weight sync went wrong: μ is NaN on some tokens (what vLLM returned
    when a fused layer was half loaded)."""

    def generate(self, prompt_token_ids, sampling, *, ignore_eos=False):
        r = super().generate(prompt_token_ids, sampling, ignore_eos=ignore_eos)
        r.logprobs[0][0] = float("nan")
        return r


def test_non_finite_mu_stops_the_run_naming_the_engine_and_the_step(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_ratio=0.0)
    trainer.engine = NaNEngine(trainer.model, chat_tokenizer)
    with pytest.raises(FloatingPointError, match=r"1 of \d+ completion tokens have a non-finite behavior log-prob "
                                                 r"\(μ\) from the NaNEngine \(step 1, round 0\)"):
        first_inputs(trainer)


def test_non_finite_mu_can_skip_the_round_counted_and_weights_unchanged(small_model_dir, chat_tokenizer, tmp_path):
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_ratio=0.0, max_steps=1,
                           nonfinite_logprobs="skip_round")
    trainer.engine = NaNEngine(trainer.model, chat_tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.nonfinite_rounds_skipped == 1 and trainer.state.global_step == 1
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # no optimizer step landed
    logged = [h for h in trainer.state.log_history if "correction/nonfinite_mu_tokens" in h]
    assert logged[0]["correction/nonfinite_mu_tokens"] == 1.0 and logged[0]["nonfinite_rounds_skipped"] == 1.0


def test_a_round_whose_weights_are_all_zero_stops_the_run(small_model_dir, chat_tokenizer, tmp_path):
    """seq_mask rejecting every sequence: nothing would be learned, so it is an error, not a step."""
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_mode="fixed", skip_layers=[1, 2, 3],
                           correction="seq_mask", clip=1.0000001)
    with pytest.raises(FloatingPointError, match="every correction weight of the round is 0 \\(seq_mask"):
        first_inputs(trainer)


def test_lora_dropout_does_not_reach_pi_old(small_model_dir, chat_tokenizer, tmp_path):
    """Nothing skipped, μ from the sampler (eval mode): with a LoRA dropout of 0.5, π_old must still
    equal μ (weights 1); computed in train mode it moved log-probs by up to 1e-2 and more."""
    from peft import LoraConfig

    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, skip_ratio=0.0,
                            steps_per_generation=2, **FP32)  # TRL computes its own π_old here (train mode)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args,
                                peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, init_lora_weights=False))
    trainer.engine = OwnLogprobEngine(trainer.model, chat_tokenizer)
    assert trainer._dropout_active
    first_inputs(trainer)
    metrics = trainer._metrics["train"]
    assert metrics["correction/ess"][-1] == pytest.approx(1.0, abs=1e-6)
    assert metrics["correction/ratio_max"][-1] == pytest.approx(1.0, abs=1e-4)
    assert metrics["correction/ratio_min"][-1] == pytest.approx(1.0, abs=1e-4)


def _dtrnet_dir(tokenizer, path):
    from archs.dtrnet import DTRNetConfig, DTRNetForCausalLM

    torch.manual_seed(0)
    config = DTRNetConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                          aux_loss_coef=0.5, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = DTRNetForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _router_loss_and_grads(model, inputs):
    """coef · router_loss of the trainer's own micro-batch, and its gradient: an independent forward."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    model.zero_grad()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.model(input_ids=ids, attention_mask=mask)
    aux = base.config.aux_loss_coef * out.router_loss
    aux.backward()
    return aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dtrnet_router_loss_reaches_the_router_in_grpo(chat_tokenizer, tmp_path):
    """loss = TRL's GRPO loss + coef · router_loss, and the router's gradient gains coef · ∇router_loss."""
    model_dir = _dtrnet_dir(chat_tokenizer, tmp_path / "dtrnet")
    trainer = make_trainer(model_dir, chat_tokenizer, tmp_path / "run", skip_ratio=0.0, beta=0.0)
    _, inputs = first_inputs(trainer)
    loss, grads = loss_and_grads(trainer, inputs)
    plain_loss = trainer._compute_loss(trainer.model, inputs)  # TRL's own loss, without the mixin
    trainer.model.zero_grad()
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    aux, aux_grads = _router_loss_and_grads(trainer.model, inputs)
    assert aux > 0
    torch.testing.assert_close(loss, plain_loss.detach() + aux, rtol=1e-5, atol=1e-6)
    router = [n for n in grads if ".router." in n]
    assert router and any(aux_grads[n].abs().max() > 1e-6 for n in router)
    for n in router:
        torch.testing.assert_close(grads[n], plain[n] + aux_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    assert trainer._metrics["train"]["aux_loss/backbone"][-1] == pytest.approx(float(aux), rel=1e-5)


def test_dtrnet_router_loss_is_trained_by_sft(chat_tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from nested_reft.sft import SFTTrainer as OurSFTTrainer

    model_dir = _dtrnet_dir(chat_tokenizer, tmp_path / "dtrnet")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "completion": [{"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(4)]
    trainer = OurSFTTrainer(model=model_dir, processing_class=chat_tokenizer, train_dataset=Dataset.from_list(rows),
                                args=SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                                               report_to=[], use_cpu=True, bf16=False, max_steps=1))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, dict(batch))
    plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))  # TRL's own
    base = trainer.model
    out = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = plain.detach() + base.config.aux_loss_coef * out.router_loss.detach()
    assert out.router_loss > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_round_buffer_round_trips_without_pickle_and_a_pickled_one_is_refused(small_model_dir, chat_tokenizer, tmp_path):
    batches = [{"prompt_ids": torch.arange(6).view(2, 3), "advantages": torch.tensor([[0.5], [-1.0]]),
                "num_items_in_batch": 7, "old_per_token_logps": None}]
    save_round_buffer(str(tmp_path), 3, batches)
    step, loaded = load_round_buffer(str(tmp_path), "cpu")
    assert step == 3 and loaded[0]["num_items_in_batch"] == 7 and loaded[0]["old_per_token_logps"] is None
    assert torch.equal(loaded[0]["prompt_ids"], batches[0]["prompt_ids"])
    assert json.load(open(tmp_path / "nested_reft_round.json"))["step"] == 3

    # a crafted pickle that writes a file when unpickled: resume refuses it and the file never appears
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({"step": 1, "batches": Evil()}, checkpoint / "nested_reft_round.pt")
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path / "run", skip_ratio=0.0)
    with pytest.raises(ValueError, match="nested_reft_round.pt is a pickled round buffer, which is not loaded"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert not (tmp_path / "pwned").exists()


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


def test_all_nan_rewards_are_counted_and_stop_the_run_instead_of_training_on_nothing(small_model_dir, chat_tokenizer, tmp_path):
    """A reward that is NaN everywhere gives every advantage 0, so no step can change the weights:
    it is logged (rewards/<name>/nonfinite) and the run stops after max_idle_steps such steps."""
    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, skip_ratio=0.0, max_steps=10,
                            max_idle_steps=3, logging_steps=1, **{k: v for k, v in FP32.items() if k != "logging_steps"})
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=nan_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    with pytest.raises(RuntimeError, match=r"no optimizer step has changed the weights for 3 steps in a row "
                                           r"\(up to step 3: 3 zero gradient\)"):
        trainer.train()
    assert trainer._metrics["train"]["rewards/nan_reward/nonfinite"][0] == 8.0


def test_an_infinite_reward_scores_nothing_instead_of_zeroing_its_group(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    calls = []

    def one_inf(completions, **kwargs):
        calls.append(1)
        return [float("inf")] + [float(i % 3) for i in range(1, len(completions))]

    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, skip_ratio=0.0, **FP32)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=one_inf, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    _, inputs = first_inputs(trainer)
    adv = inputs["advantages"]
    assert torch.isfinite(adv).all()
    assert adv[:4].abs().sum() > 0  # the group holding the inf still trains (its other members differ)
    assert trainer._metrics["train"]["rewards/one_inf/nonfinite"][-1] == 1.0


def test_a_nan_loss_on_every_step_stops_the_run(small_model_dir, chat_tokenizer, tmp_path):
    args = NestedReFTConfig(output_dir=str(tmp_path), full_model_probe_every=0, skip_ratio=0.0, max_steps=10,
                            max_idle_steps=2, **FP32)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    compute = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: compute(*a, **k) * float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"for 2 steps in a row \(up to step 2: 2 nonfinite\)"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_non_finite_metrics_are_written_and_read_back(tmp_path):
    from types import SimpleNamespace

    from nested_reft.reporting import JsonlMetricsCallback, read_jsonl

    cb = JsonlMetricsCallback(tmp_path / "metrics.jsonl")
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"reward": float("nan"), "kl": float("inf"), "loss": 0.5, "flag": True})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert '"reward": "NaN"' in line and '"kl": "Infinity"' in line  # valid JSON, and a trace of the NaN
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert row["step"] == 3 and row["loss"] == 0.5 and row["kl"] == float("inf") and row["reward"] != row["reward"]


def test_the_guarded_optimizer_works_with_transformers_own_scheduler_setup(small_model_dir, chat_tokenizer, tmp_path):
    """`create_optimizer_and_scheduler` (public) wraps optimizer.step through its __func__: the guard
    must be a bound method."""
    trainer = make_trainer(small_model_dir, chat_tokenizer, tmp_path, skip_ratio=0.0, max_steps=3)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(FP32["learning_rate"])
    trainer.lr_scheduler.step()
