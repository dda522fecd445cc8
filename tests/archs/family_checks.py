"""Checks every architecture family must pass (SPEC §3–9 "rules shared by all of them"), written once.

Each family's test file builds a tiny instance and calls these. They compare numbers, never
shapes: decode against the full forward, one row against another, a saved copy against the
original, and the Nested-ReFT correction weights against 1 when nothing is skipped.
"""

from __future__ import annotations

import copy
import re

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from archs.cache_utils import cache_tensors

PAD = 0


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded with token 0: (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def assert_decode_matches_forward(model, prompt_lengths: list[int], new_tokens: int, atol: float = 1e-4,
                                  rtol: float = 1e-4) -> None:
    """Greedy `generate()` with the family's cache gives, at every step, the logits of one full
    forward over the whole left-padded sequence (positions of real tokens only)."""
    model.eval()
    ids, mask = left_padded_batch(model.config.vocab_size, prompt_lengths)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=PAD,
                         eos_token_id=None)
    step_logits = torch.stack(out.logits, dim=1).float()  # (B, new_tokens, V)
    full_mask = torch.cat([mask, torch.ones(ids.size(0), new_tokens, dtype=mask.dtype)], dim=1)
    full = model(input_ids=out.sequences, attention_mask=full_mask).logits.float()
    width = ids.size(1)
    want = full[:, width - 1 : width - 1 + new_tokens]
    torch.testing.assert_close(step_logits, want, atol=atol, rtol=rtol)


@torch.no_grad()
def assert_rows_independent(model, lengths: list[int] = (5, 9), seed: int = 0) -> None:
    """Changing row 1 (its tokens and its padding) never changes row 0's logits: tolerance 0."""
    model.eval()
    ids, mask = left_padded_batch(model.config.vocab_size, list(lengths), seed)
    base = model(input_ids=ids, attention_mask=mask).logits[0]
    other = ids.clone()
    other[1, mask[1].bool()] = torch.randint(1, model.config.vocab_size, (int(mask[1].sum()),),
                                             generator=torch.Generator().manual_seed(seed + 1))
    other_mask = mask.clone()
    other_mask[1, : ids.size(1) // 2] = 0  # a different amount of padding too
    changed = model(input_ids=other, attention_mask=other_mask).logits[0]
    assert torch.equal(base, changed), (base - changed).abs().max()


# transformers' attention interfaces a family may be built with: eager adds the mask it is given, SDPA
# also takes a boolean one, so a family that builds its own masks must pass every check under both.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@torch.no_grad()
def assert_causal(model, lengths: list[int] = (7, 4, 3)) -> None:
    """Changing one token never changes the logits of a position before it (tolerance 0), and does change
    its own position's (so the check is not vacuous): the last token, and one in the middle."""
    model.eval()
    ids, mask = left_padded_batch(model.config.vocab_size, list(lengths))
    base = model(input_ids=ids, attention_mask=mask).logits
    width = ids.size(1)
    for col in (width - 1, width - min(lengths)):  # real in every row
        other = ids.clone()
        other[:, col] = other[:, col] % (model.config.vocab_size - 1) + 1  # another real token
        changed = model(input_ids=other, attention_mask=mask).logits
        before = mask[:, :col].bool()
        assert torch.equal(base[:, :col][before], changed[:, :col][before]), (
            col, (base[:, :col][before] - changed[:, :col][before]).abs().max())
        assert not torch.allclose(base[:, col], changed[:, col]), col


@torch.no_grad()
def assert_eager_equals_sdpa(build, lengths: list[int] = (7, 4, 1), atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """`build(attn_implementation)` gives the same weights under each interface: the logits of a
    left-padded batch agree at every real position (float32, 1e-5)."""
    logits = {}
    for attn in ATTENTION_IMPLEMENTATIONS:
        model = build(attn).eval()
        assert model.config._attn_implementation == attn, (attn, model.config._attn_implementation)
        ids, mask = left_padded_batch(model.config.vocab_size, list(lengths))
        logits[attn] = model(input_ids=ids, attention_mask=mask).logits.float()[mask.bool()]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=atol, rtol=rtol)


@torch.no_grad()
def assert_save_load_round_trip(model, path) -> torch.nn.Module:
    """`save_pretrained` then `AutoModelForCausalLM.from_pretrained` (with the same attention interface)
    gives the same logits exactly."""
    model.eval()
    ids, mask = left_padded_batch(model.config.vocab_size, [4, 7])
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=model.config._attn_implementation).eval()
    assert type(loaded) is type(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       loaded(input_ids=ids, attention_mask=mask).logits)
    return loaded


def assert_lora_trains(model, target_modules: list[str]) -> None:
    """PEFT LoRA on the named projections: a backward step reaches the adapters and nothing else."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    ids, mask = left_padded_batch(model.config.vocab_size, [6, 6])
    loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads), sorted(grads)[:5]


# --------------------------------------------------------------------------- Nested-ReFT on a family

RL_SHARED = dict(
    per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-3,
    report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True, temperature=1.0,
    top_k=0, top_p=1.0, num_train_epochs=1, bf16=False, full_model_probe_every=0,
)


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 5) for c in completions]


def _prompts():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(4)])


def nested_reft_trainer(model_dir: str, tokenizer, output_dir, **kwargs):
    from nested_reft.config import NestedReFTConfig
    from nested_reft.trainer import NestedReFTTrainer

    args = NestedReFTConfig(output_dir=str(output_dir), **{**RL_SHARED, **kwargs})
    return NestedReFTTrainer(model=model_dir, reward_funcs=_length_reward, processing_class=tokenizer,
                             train_dataset=_prompts(), args=args)


def assert_nested_reft_corrects_exactly(model_dir: str, tokenizer, output_dir, monkeypatch,
                                        attn_implementation: str | None = None) -> None:
    """A family under Nested-ReFT (HF engine): with nothing skipped, the sampler's log-probs equal the
    trainer's full forward, so every correction weight is 1 to float error; with layers skipped,
    training steps run and the weights really move. `attn_implementation`: the model loads with it."""
    init = {} if attn_implementation is None else {"model_init_kwargs": {"attn_implementation": attn_implementation}}
    # Force the comparison: normally an unskipped round short-cuts to d_t = 0 without a forward.
    monkeypatch.setattr("nested_reft.trainer.NestedReFTTrainer._mu_is_pi_old", lambda self: False)
    trainer = nested_reft_trainer(model_dir, tokenizer, output_dir / "exact", skip_ratio=0.0, correction="tis",
                                  clip=2.0, **init)
    if attn_implementation is not None:
        assert trainer.model.config._attn_implementation == attn_implementation
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = trainer._metrics["train"]
    assert abs(m["correction/ratio_min"][0] - 1) < 1e-4 and abs(m["correction/ratio_max"][0] - 1) < 1e-4, (
        m["correction/ratio_min"], m["correction/ratio_max"])

    monkeypatch.undo()
    trainer = nested_reft_trainer(model_dir, tokenizer, output_dir / "skipped", skip_ratio=0.34, keep_first=1,
                                  keep_last=1, correction="tis", clip=2.0, max_steps=2, **init)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "correction/ratio_max" in row]
    assert len(logs) == 2 and all(trainer.skip_policy.history)
    assert all(torch.isfinite(torch.tensor([row["loss"], row["correction/ess"]])).all() for row in logs)
    ratio_spread = max(r["correction/ratio_max"] for r in logs) - min(r["correction/ratio_min"] for r in logs)
    assert ratio_spread > 1e-3, "a skipped behavior model gave weights of exactly 1: skipping did nothing"


class _PadTokenizer:
    pad_token_id = PAD
    eos_token_id = None


@torch.no_grad()
def assert_compacted_sampling_exact(model, eos_fraction: float = 0.15, compact_every: int = 3) -> None:
    """The HF rollout engine in phases (finished rows dropped with `cache.batch_select_indices`,
    the rest continued from the cache): the sampler's log-probs equal a teacher-forced forward of
    each unpadded row, and rows really left the batch."""
    from nested_reft.engines import HFEngine, SamplingSpec

    model.eval()
    vocab = model.config.vocab_size
    eos = list(range(vocab - max(1, int(eos_fraction * vocab)), vocab))
    engine = HFEngine(model, _PadTokenizer(), eos_token_ids=eos, compact_every=compact_every)
    sizes = []
    real = engine._generate_phase
    engine._generate_phase = lambda ids, *a, **k: (sizes.append(ids.size(0)), real(ids, *a, **k))[1]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab - len(eos), (n,), generator=g).tolist() for n in (1, 2, 3, 5, 4, 1, 6, 2)]
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=4 * compact_every, temperature=1.0, seed=0))
    assert len(sizes) >= 2 and sizes[-1] < len(prompts), sizes  # some rows finished, some went on
    for prompt, completion, lps in zip(prompts, out.completion_ids, out.logprobs):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), want, atol=1e-4, rtol=0)


@torch.no_grad()
def assert_cache_owns_its_storage(model, lengths=(40, 33)) -> None:
    """Every tensor the family's cache keeps after a prefill owns its storage: a slice of a prefill
    activation (a conv window, per-position maxima) would keep the whole activation alive, so the
    cache would grow with N although its own tensors do not."""
    model.eval()
    ids, mask = left_padded_batch(model.config.vocab_size, list(lengths))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None, return_dict_in_generate=True)
    tensors = cache_tensors(out.past_key_values)
    assert tensors
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (tuple(t.shape), t.untyped_storage().nbytes())


def rebuilt_without_layers(model, skip, layer_lists=(), build=None):
    """An independent reference for skipping: a fresh model with the kept layers only and their weights.

    `layer_lists`: config fields holding layer indices (softmax, retrieval, dense layers ...), renumbered
    and without the skipped ones. `build(config_dict)` makes the fresh model (default: the Auto classes
    from the config's model type)."""
    kept = [i for i in range(model.config.num_hidden_layers) if i not in skip]
    remap = {old: new for new, old in enumerate(kept)}
    config = model.config.to_dict()
    config["num_hidden_layers"] = len(kept)
    for key in layer_lists:
        config[key] = [remap[i] for i in config[key] if i in remap]
    ref = build(config) if build else AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m is None:
            state[key] = value
        elif int(m[1]) in remap:
            state[f"model.layers.{remap[int(m[1])]}.{m[2]}"] = value
    ref.load_state_dict(state, strict=True)
    return ref.eval()
