"""Registering a family with the transformers Auto classes, in one place for every family."""

from __future__ import annotations

from types import MappingProxyType

from transformers import AutoConfig, AutoModelForCausalLM


def register_family(config_cls, model_cls=None) -> None:
    """`AutoConfig` (and `AutoModelForCausalLM` when a model class is given) learn the family.

    TRL 1.16 loads a model by path whose architecture transformers does not ship by reading
    `config.auto_map`, and transformers then tests `name in config.auto_map`; a config registered
    in-process has none, so it gets an empty read-only class attribute (never serialised): "no
    remote code", which makes TRL fall back to `AutoModelForCausalLM`.
    """
    if not hasattr(config_cls, "auto_map"):
        config_cls.auto_map = MappingProxyType({})
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    if model_cls is not None:
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
