"""NestedReFTTrainer against TRL's GRPOTrainer, and its per-round bookkeeping."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from nested_reft.config import NestedReFTConfig
from nested_reft.trainer import NestedReFTTrainer

SHARED = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=12, learning_rate=1e-3,
    report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True, temperature=1.0,
    top_k=0, top_p=1.0, num_train_epochs=1,
)


def length_reward(completions, **kwargs):
    """Deterministic and varied within a group, so advantages are non-zero."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 5) for c in completions]


def dataset():
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(4)]
    return Dataset.from_list(rows)


def first_inputs(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer._prepare_inputs(batch)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("correction", ["none", "tis"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_nothing_skipped_reproduces_trl_grpo_loss_and_gradients(small_model_dir, chat_tokenizer, tmp_path, correction, loss_type, monkeypatch):
    # TRL shuffles each generation batch with the global RNG; keep the order so rows line up.
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    beta = 0.04 if loss_type == "grpo" else 0.0  # with a reference model on one of the cases
    ours = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
        train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path / "a"), skip_ratio=0.0, correction=correction,
                              loss_type=loss_type, beta=beta, full_model_probe_every=0, **SHARED),
    )
    sampled = []
    generate = ours.engine.generate
    ours.engine.generate = lambda ids, spec: sampled.append(generate(ids, spec)) or sampled[-1]
    batch, ours_inputs = first_inputs(ours)
    completions = sampled[0].completion_ids

    theirs = GRPOTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
        train_dataset=dataset(),
        args=GRPOConfig(output_dir=str(tmp_path / "b"), loss_type=loss_type, beta=beta, **SHARED),
    )
    theirs._generate_single_turn = lambda prompt_ids, *a, **k: ([list(c) for c in completions], None)
    theirs.model.train()
    theirs_inputs = theirs._prepare_inputs(batch)
    assert torch.equal(ours_inputs["completion_ids"], theirs_inputs["completion_ids"])

    loss_a, grads_a = loss_and_grads(ours, ours_inputs)
    loss_b, grads_b = loss_and_grads(theirs, theirs_inputs)
    assert sum(float(g.abs().sum()) for g in grads_b.values()) > 0  # a real gradient is compared
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-5, msg=name)
    metrics = ours._metrics["train"]
    assert metrics["correction/ess"][-1] == pytest.approx(1.0, abs=1e-5)
    assert metrics["correction/ratio_max"][-1] == pytest.approx(1.0, abs=1e-4)


def test_skipped_rounds_fold_weights_into_advantages_and_log_diagnostics(small_model_dir, chat_tokenizer, tmp_path):
    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer, train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.34, keep_first=1, keep_last=1,
                              correction="tis", clip=2.0, full_model_probe_every=1, **SHARED),
    )
    _, inputs = first_inputs(trainer)
    assert len(trainer.skip_policy.history) == 1 and len(trainer.skip_policy.history[0]) == 2
    adv = inputs["advantages"]
    assert adv.dim() == 2 and adv.shape == inputs["completion_ids"].shape
    mask = inputs["completion_mask"].bool()
    assert torch.all(adv[~mask] == 0)
    m = trainer._metrics["train"]
    for key in ("ess", "ratio_mean", "ratio_min", "ratio_max", "clipped_frac", "kl_behavior"):
        assert len(m[f"correction/{key}"]) == 1
    assert 0 < m["correction/ess"][0] <= 1
    assert m["correction/ratio_min"][0] < 1 < m["correction/ratio_max"][0]  # the skipped model differs
    assert m["rollout/skipped_layers"][0] == 2
    assert m["rollout/behavior_tokens_per_s"][0] > 0 and m["rollout/full_tokens_per_s"][0] > 0


def test_pot_behavior_model_samples_and_is_corrected(small_model_dir, chat_tokenizer, tmp_path):
    from nested_reft.engines.pot import PoTHFEngine

    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer, train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path), behavior="pot", pot_bits=2, pot_group_size=32, skip_ratio=0.0,
                              correction="tis", max_steps=2, full_model_probe_every=0, **SHARED),
    )
    assert isinstance(trainer.engine, PoTHFEngine) and trainer.engine.behavior.bits == 2
    layer = trainer.engine.behavior.model.model.layers[0].mlp.up_proj
    initial = layer.packed.clone(), layer.scales.clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "correction/ess" in h]
    assert len(logged) == 2
    # the 2-bit copy is a different distribution: ratios spread around 1 and ESS drops below 1
    assert all(h["correction/ratio_min"] < 1 < h["correction/ratio_max"] and h["correction/ess"] < 1 for h in logged)
    # the copy was re-quantized from the trained policy before round 2 (lr 1e-3 moves the scales)
    assert [h["rollout/weight_sync_seconds"] > 0 for h in logged] == [True, True]
    assert not torch.equal(layer.scales, initial[1]) or not torch.equal(layer.packed, initial[0])


def test_training_runs_a_few_steps(small_model_dir, chat_tokenizer, tmp_path):
    args = NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.34, keep_first=1, keep_last=1,
                            correction="ess_adaptive", max_steps=3, full_model_probe_every=2, **SHARED)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert len(trainer.skip_policy.history) == 3
    logged = [h for h in trainer.state.log_history if "correction/ess" in h]
    assert len(logged) == 3 and all("rollout/behavior_tokens_per_s" in h for h in logged)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(correction="is"), "'is'"),
        (dict(skip_ratio=1.0), "got 1.0"),
        (dict(skip_mode="diagonal"), "'diagonal'"),
        (dict(skip_mode="fixed"), "needs skip_layers"),
        (dict(clip=0.5), "got 0.5"),
        (dict(lam=2.0), "got 2.0"),
        (dict(engine="tensorrt"), "'tensorrt'"),
        (dict(skip_k_min=1), "skip_k_min and skip_k_max"),
        (dict(use_vllm=True), "use_vllm"),
        (dict(behavior="int8"), "'int8'"),
        (dict(behavior="pot", pot_bits=5), "got 5"),
        (dict(behavior="pot", engine="vllm_server"), "needs engine='hf'"),
        (dict(correction="ess_adaptive", skip_mode="fixed", skip_layers=[2]), "skip_mode='fixed'"),
        (dict(generation_kwargs={"suppress_tokens": [3]}), "suppress_tokens"),
        (dict(cache_implementation="static", engine="vllm_server"), "'static'"),
        (dict(behavior_logprobs="rescore", top_k=5), "top_k=5"),
        (dict(behavior_logprobs="rescore", repetition_penalty=1.1), "repetition_penalty=1.1"),
        (dict(behavior_logprobs="rescore", behavior="pot"), "behavior='pot'"),
        (dict(behavior_logprobs="forward"), "'forward'"),
        (dict(top_k=-2), "got -2"),
        (dict(min_p=1.5), "got 1.5"),
        (dict(repetition_penalty=0.0), "got 0.0"),
        (dict(full_model_probe_every=-1), "-1"),
    ],
)
def test_bad_config_fails_before_any_model_loads(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        NestedReFTConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_rollout_func_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="rollout_func"):
        NestedReFTTrainer(model="no/such-model", reward_funcs=length_reward, rollout_func=lambda prompts, trainer: {},
                          args=NestedReFTConfig(output_dir=str(tmp_path), **SHARED))


def test_every_turn_of_a_round_samples_with_the_rounds_skip_set(small_model_dir, chat_tokenizer, tmp_path, monkeypatch):
    """A tool call makes TRL sample a second turn inside one `_generate`: same skip set (so μ is one
    model), its own seeds, one draw, one round, one set of round metrics."""
    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer, train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.34, keep_first=1, keep_last=1,
                              full_model_probe_every=0, **SHARED),
    )
    calls = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda ids, spec, **kw: calls.append((trainer.engine.skip, spec.seed)) or generate(ids, spec, **kw)
    trl_generate = GRPOTrainer._generate

    def with_a_tool_turn(self, prompts):  # stands in for TRL's tool loop: one more turn in the round
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        self._generate_single_turn(prompt_ids, None, {}, 1)
        return trl_generate(self, prompts)

    monkeypatch.setattr(GRPOTrainer, "_generate", with_a_tool_turn)
    first_inputs(trainer)
    assert len(calls) == 2 and calls[0][0] == calls[1][0] == trainer.skip_policy.history[0] != ()
    assert calls[0][1] != calls[1][1]
    assert len(trainer.skip_policy.history) == 1 and trainer._round == 1
    assert len(trainer._metrics["train"]["rollout/skipped_layers"]) == 1
    with pytest.raises(RuntimeError, match="generation round"):
        trainer._generate_single_turn([[1, 2]], None, {}, 1)


def test_skip_ratio_logs_the_k_drawn_and_the_probe_only_when_measured(small_model_dir, chat_tokenizer, tmp_path):
    args = NestedReFTConfig(output_dir=str(tmp_path), skip_k_min=0, skip_k_max=2, keep_first=1, keep_last=1,
                            full_model_probe_every=2, max_steps=4, **SHARED)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    probes = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda ids, spec, ignore_eos=False: (
        probes.append((len(ids), spec.max_new_tokens, trainer.engine.skip)) if ignore_eos else None) or generate(ids, spec, ignore_eos=ignore_eos)
    trainer.train()
    history = trainer.skip_policy.history
    logs = [h for h in trainer.state.log_history if "rollout/skip_ratio" in h]
    assert [h["rollout/skip_ratio"] for h in logs] == pytest.approx([len(s) / 6 for s in history])
    due, measured = False, []  # due every 2 rounds; a round that skips nothing defers it to the next
    for r, s in enumerate(history):
        due = due or r % 2 == 0
        if due and s:
            measured.append(r)
            due = False
    assert [r for r, h in enumerate(logs) if "rollout/full_tokens_per_s" in h] == measured
    assert all("rollout/probe_speedup" in logs[r] and logs[r]["rollout/full_tokens_per_s"] > 0 for r in measured)
    # fixed-length workload: one prompt per group (8 / 4), max_completion_length tokens, EOS ignored
    assert probes == [p for r in measured for p in ((2, 12, history[r]), (2, 12, ()))]


def test_trailing_completion_padding_is_trimmed_and_changes_no_number(small_model_dir, chat_tokenizer, tmp_path):
    """Catches a trim that cuts a used column (loss changes) or one that never trims (width stays)."""
    from nested_reft.trainer import trim_completion_padding

    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer, train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.34, keep_first=1, keep_last=1,
                              correction="tis", clip=2.0, full_model_probe_every=0, **SHARED,
                              bf16=False),  # float32: bf16 autocast rounds differently at another width
    )
    _, inputs = first_inputs(trainer)
    mask = inputs["completion_mask"]
    assert mask[:, -1].any()  # what _prepare_inputs returns ends at its longest completion
    extra = 5  # a round padded past this batch's longest completion, as TRL pads to the round's longest
    padded = dict(inputs)
    b = mask.size(0)
    for key, fill in (("completion_ids", torch.randint(1, 50, (b, extra))), ("completion_mask", torch.zeros(b, extra)),
                      ("advantages", torch.randn(b, extra)), ("old_per_token_logps", -torch.rand(b, extra))):
        if key in inputs:
            padded[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], dim=1)
    trimmed = trim_completion_padding(padded)
    for key in ("completion_ids", "completion_mask", "advantages"):
        assert torch.equal(trimmed[key], inputs[key])
    assert torch.equal(trimmed["prompt_ids"], inputs["prompt_ids"])  # prompts are left alone
    loss_padded, grads_padded = loss_and_grads(trainer, padded)
    loss_trimmed, grads_trimmed = loss_and_grads(trainer, trimmed)
    torch.testing.assert_close(loss_trimmed, loss_padded, rtol=1e-6, atol=1e-7)
    for name, grad in grads_padded.items():  # float sums over a different width: summation-order error only
        torch.testing.assert_close(grads_trimmed[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))
    cut = dict(padded, completion_mask=padded["completion_mask"].clone())
    cut["completion_mask"][:, -1] = 1  # a used last column: nothing may be trimmed
    assert trim_completion_padding(cut)["completion_ids"].size(1) == padded["completion_ids"].size(1)


def test_a_non_finite_loss_skips_that_optimizer_step_and_training_goes_on(small_model_dir, chat_tokenizer, tmp_path):
    """Catches a NaN step that reaches the weights (all would become NaN) and a run that stops on it."""
    trainer = NestedReFTTrainer(
        model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer, train_dataset=dataset(),
        args=NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.0, full_model_probe_every=0, max_steps=3,
                              **{**SHARED, "num_generations": 4, "per_device_train_batch_size": 4}),
    )
    real = trainer.compute_loss
    snapshots = []

    def loss_with_a_nan_on_step_2(model, inputs, *args, **kwargs):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss = real(model, inputs, *args, **kwargs)
        return loss * float("nan") if len(snapshots) == 2 else loss

    trainer.compute_loss = loss_with_a_nan_on_step_2
    trainer.train()
    final = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert trainer.state.global_step == 3 and trainer.nonfinite_steps_skipped == 1
    assert all(torch.isfinite(p).all() for p in final.values())
    moved = lambda a, b: any(not torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert moved(snapshots[0], snapshots[1])  # step 1 trained
    assert not moved(snapshots[1], snapshots[2])  # step 2 (NaN) was skipped: weights untouched
    assert moved(snapshots[2], final)  # step 3 trained again
    logged = [row["nonfinite_steps_skipped"] for row in trainer.state.log_history if "nonfinite_steps_skipped" in row]
    assert logged == [1.0]


def test_a_sleeping_engine_is_woken_before_each_round_and_put_back_to_sleep_after(small_model_dir, chat_tokenizer, tmp_path):
    # vLLM's sleep mode as TRL uses it, with a recording engine (sleep itself needs a GPU): wake up,
    # then sync the weights and sample; sleep (level 1: the weights are kept) until the next round.
    args = NestedReFTConfig(output_dir=str(tmp_path), skip_ratio=0.34, keep_first=1, keep_last=1, max_steps=2,
                            full_model_probe_every=0, **SHARED)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)
    events, inner = [], trainer.engine

    class Recording:
        sleep_enabled, shares_policy_weights = True, False
        asleep = True  # built asleep: the first round must wake it

        def __getattr__(self, name):
            return getattr(inner, name)

        def wake_up(self):
            events.append("wake")
            self.asleep = False

        def sleep(self, level=1):
            events.append(f"sleep{level}")
            self.asleep = True

        def load_weights(self, named):
            assert not self.asleep, "weights were pushed to a sleeping engine"
            events.append("sync")

        def generate(self, *a, **kw):
            assert not self.asleep, "a sleeping engine was asked to generate"
            events.append("generate")
            return inner.generate(*a, **kw)

    trainer.engine = Recording()
    trainer.train()
    assert events == ["wake", "sync", "generate", "sleep1"] * 2


def test_out_of_memory_while_generating_names_the_options(small_model_dir, chat_tokenizer, tmp_path):
    args = NestedReFTConfig(output_dir=str(tmp_path), max_steps=1, full_model_probe_every=0, rollout_batch_size=16, **SHARED)
    trainer = NestedReFTTrainer(model=small_model_dir, reward_funcs=length_reward, processing_class=chat_tokenizer,
                                train_dataset=dataset(), args=args)

    def generate(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.engine.generate = generate
    with pytest.raises(torch.OutOfMemoryError) as e:
        trainer.train()
    message = str(e.value)
    assert "out of memory while generating 8 rollouts with the HFEngine (step 0, round 0)" in message
    assert "rollout_batch_size=16" in message and "max_completion_length=12" in message and "engine='vllm'" in message
    assert "Tried to allocate" in str(e.value.__cause__)  # the original error is kept
