"""vLLM worker extension (`worker_extension_cls`): reached on every worker by `collective_rpc`,
from `LLM.collective_rpc` (colocated engine) or from the `/collective_rpc` endpoint of `vllm serve`
(server mode, `VLLM_SERVER_DEV_MODE=1`).

Methods are mixed into vLLM's worker class, so `self` is the worker (`self.model_runner`,
`self.reload_weights`). Kept free of vLLM imports so the class resolves cheaply in any process.
Over HTTP, vLLM passes RPC arguments as strings ("only serialized string args", in its
`/collective_rpc` handler), so list arguments also arrive JSON-encoded.

Every change of the skip set or the weights bumps a counter (`version` in `nested_reft_info`): a
client that records it after its own change and finds another one after sampling knows that
someone else changed the server in between.
"""

from __future__ import annotations

import json
import logging
import os

# vLLM's in-place reload warns about every layer that received no tensor; a partial update (only
# what an optimizer step changed, e.g. LoRA-merged modules) is intended here, and the layers not
# sent keep their values (tests/nested_reft/test_vllm_engine.py checks it).
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


class NestedReFTWorkerExtension:
    def _skip_model(self):
        model = self.model_runner.get_model()
        if not hasattr(model, "set_skip"):
            raise TypeError(
                f"the served model {type(model).__name__} is not skip-aware; build the LLM with "
                "hf_overrides={'architectures': [nested_reft.engines.vllm_plugin.skip_architecture(...)]}"
            )
        return model

    def _bump_version(self) -> None:
        self._nested_reft_version = getattr(self, "_nested_reft_version", 0) + 1

    def nested_reft_info(self) -> dict:
        model = self._skip_model()
        return {"num_layers": model.num_decoder_layers, "model_class": type(model).__name__,
                "skip": sorted(model.nested_reft_skip), "version": getattr(self, "_nested_reft_version", 0)}

    def nested_reft_set_skip(self, layers: list[int] | str) -> list[int]:
        model = self._skip_model()
        model.set_skip(json.loads(layers) if isinstance(layers, str) else layers)
        self._bump_version()
        return sorted(model.nested_reft_skip)

    def nested_reft_load_weights(self, weights) -> int:
        """Load checkpoint-format (Hugging Face named) tensors in place; returns how many.

        `weights` is a list of (name, tensor) pairs (in-process engine), or the path of a
        safetensors file (vLLM's multiprocessing mode, where tensors passed as RPC arguments
        arrive as lists, and server mode, where RPC arguments are strings)."""
        if isinstance(weights, str):
            from safetensors.torch import load_file

            named = list(load_file(weights).items())
        else:
            named = list(weights)
        loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=named, is_checkpoint_format=True)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
        self.nested_reft_after_weight_update()
        return len(named)

    def nested_reft_after_weight_update(self) -> None:
        """What every weight update ends with, whoever loaded the tensors (our reload above, or
        vLLM's weight-transfer engines behind `/update_weights`)."""
        self._retie_embeddings()
        self._bump_version()

    def nested_reft_read_text(self, path: str) -> str:
        """The contents of a small text file: the client checks that the folder it writes weight
        files to is the one this worker reads (server mode, weight_transfer 'file')."""
        with open(path) as f:
            return f.read()

    def _retie_embeddings(self) -> None:
        """A tied LM head is never loaded itself, so the reload does not re-run its post-load
        processing: on CPU that processing packs the weight for the GEMM kernel, and the head would
        keep computing logits with the *old* embedding. Re-tie it and process it again."""
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if getattr(config, "tie_word_embeddings", False) and hasattr(head, "weight") and hasattr(embed, "weight"):
            head.weight = embed.weight
            quant_method = getattr(head, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(head)

    def nested_reft_pid(self) -> int:
        return os.getpid()
