"""recipes/pretrain_compare.py at tiny settings: every family trains on the same bytes and is measured."""

import json

import torch
from transformers import DynamicCache

from recipes import pretrain_compare


def test_every_family_trains_and_is_measured_against_length(tmp_path):
    results = pretrain_compare.main([
        "--train_tokens", "2048", "--seq_len", "32", "--batch_size", "8", "--hidden_size", "32",
        "--intermediate_size", "64", "--lengths", "12", "24", "--decode_tokens", "2", "--repeats", "1",
        "--log_every", "2", "--output_dir", str(tmp_path)])
    assert {"llama", "scout_swa", "scout_mamba", "dtrnet", "integral"} <= set(results)
    for name, r in results.items():
        first, last = r["train"]["losses"][0]["loss"], r["train"]["final_loss"]
        assert last < first, (name, first, last)  # it learned something from the bytes
        assert [m["length"] for m in r["lengths"]] == [12, 24]
    # Llama's cache is exactly L x N x 2 x kv_heads x head_dim x 4 bytes; DTRNet's holds routed tokens only
    llama = results["llama"]["lengths"]
    assert [m["cache_bytes"] for m in llama] == [4 * n * 2 * 2 * 8 * 4 for n in (12, 24)]
    assert results["dtrnet"]["train"]["routed_fraction"]
    assert results["scout_swa"]["parameters"] > 0 and results["scout_swa"]["lengths"][1]["cache_bytes"] < llama[1]["cache_bytes"]
    saved = json.loads((tmp_path / "pretrain_compare.json").read_text())
    assert set(saved["results"]) == set(results) and (tmp_path / "pretrain_compare.png").stat().st_size > 0


def test_cache_bytes_counts_every_tensor_once():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)
    cache.update(k, k.clone(), 0)
    cache.update(k.clone(), k.clone(), 1)
    assert pretrain_compare.cache_bytes(cache) == 4 * k.numel() * 4
