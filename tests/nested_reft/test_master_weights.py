"""fp32 master weights for half-precision parameters: at RL learning rates the whole AdamW update
lands (in fp32), where AdamW on bf16 parameters moved about 2% of the weights."""

import copy

import pytest
import torch
import yaml

from nested_reft.master_weights import MasterWeightAdamW

LR = 1e-6


def bf16_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(torch.bfloat16)


def run(model, optimizer, steps=3):
    torch.manual_seed(1)
    grads = []
    for _ in range(steps):
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        grads.append([p.grad.float().clone() for p in model.parameters()])
        optimizer.step()
    return grads


def test_masters_follow_fp32_adamw_exactly_and_the_bf16_weights_are_their_rounding():
    model = bf16_model()
    start = [p.detach().float().clone() for p in model.parameters()]
    opt = MasterWeightAdamW([{"params": list(model.parameters())}], lr=LR, weight_decay=0.01)
    grads = run(model, opt)
    # the reference: fp32 AdamW on fp32 copies, fed the same gradients
    ref = [torch.nn.Parameter(s.clone()) for s in start]
    ref_opt = torch.optim.AdamW(ref, lr=LR, weight_decay=0.01)
    for step in grads:
        for p, g in zip(ref, step):
            p.grad = g
        ref_opt.step()
    for master, r, p, s in zip(opt.masters, ref, model.parameters(), start):
        torch.testing.assert_close(master, r.detach(), rtol=0, atol=1e-9)
        assert (master != s).float().mean() > 0.99  # the update landed on (nearly) every weight
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_plain_adamw_on_bf16_weights_loses_the_update():
    """What the masters fix: the same three steps on bf16 parameters move few weights."""
    model = bf16_model()
    start = [p.detach().clone() for p in model.parameters()]
    run(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01))
    moved = sum(int((p.detach() != s).sum()) for p, s in zip(model.parameters(), start))
    assert moved / sum(s.numel() for s in start) < 0.2


def test_state_dict_keeps_the_masters():
    model = bf16_model()
    opt = MasterWeightAdamW([{"params": list(model.parameters())}], lr=LR)
    run(model, opt, steps=2)
    clone = copy.deepcopy(model)
    opt2 = MasterWeightAdamW([{"params": list(clone.parameters())}], lr=LR)
    opt2.load_state_dict(opt.state_dict())
    for a, b in zip(opt.masters, opt2.masters):
        assert torch.equal(a, b)
    assert not all(torch.equal(m.to(torch.bfloat16).float(), m) for m in opt.masters)  # masters hold more than bf16
    with pytest.raises(ValueError, match="holds 4 master weights, this model 2"):
        MasterWeightAdamW([{"params": list(clone[0].parameters())}], lr=LR).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("config", ["math_reft_qwen2.5_math_1.5b_gsm8k.yaml", "math_reft_qwen2.5_math_1.5b_math.yaml",
                                    "r1t1_grpo_qwen2.5_7b.yaml"])
def test_an_optimizer_step_of_the_shipped_config_moves_most_weights(config, chat_tokenizer, tmp_path):
    """The shipped full fine-tune configs (their dtype and learning rate) through the trainer's
    optimizer, on a small random model in that dtype: one step must change (nearly) every weight
    of the copy being trained. With AdamW on the bf16 weights about 2% changed."""
    from datasets import Dataset
    from test_trainer import length_reward
    from transformers import AutoModelForCausalLM

    from archs.tiny.build import TinyMathRecipe, build_model
    from nested_reft.config import NestedReFTConfig
    from nested_reft.trainer import NestedReFTTrainer

    settings = yaml.safe_load(open(f"recipes/configs/{config}"))
    dtype = getattr(torch, settings["dtype"])
    torch.manual_seed(0)
    build_model(TinyMathRecipe(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128),
                chat_tokenizer).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
    trainer = NestedReFTTrainer(
        model=model, reward_funcs=length_reward, processing_class=chat_tokenizer,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "1 + 1?"}]}] * 4),
        args=NestedReFTConfig(output_dir=str(tmp_path / "run"), learning_rate=settings["learning_rate"],
                              weight_decay=settings.get("weight_decay", 0.0), per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=4, report_to=[], use_cpu=True,
                              bf16=False, full_model_probe_every=0, skip_ratio=0.0))
    optimizer = trainer.create_optimizer()
    named = {n: p for n, p in trainer.model.named_parameters() if "embed" not in n}
    trained = dict(zip(optimizer.model_params, optimizer.masters)) if isinstance(optimizer, MasterWeightAdamW) else {}
    before = {n: trained.get(p, p).detach().float().clone() for n, p in named.items()}
    torch.manual_seed(2)
    ids = torch.randint(0, len(chat_tokenizer), (4, 12))
    trainer.model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = sum(int((trained.get(p, p).detach().float() != before[n]).sum()) for n, p in named.items())
    total = sum(p.numel() for p in named.values())
    assert changed / total > 0.9, f"{changed / total:.1%} of the weights changed"
