"""Architecture families; importing `archs` registers each with the transformers Auto classes."""

from . import (  # noqa: F401
    balcony,  # Balcony: self-distilled early exits on a frozen base
    dtrnet,  # DTRNet: dynamic token routing
    echo,  # ECHO: layers that read an earlier layer's K/V
    integral,  # Integral attention
    regla,  # ReGLA: gated linear attention (and softmax hybrids)
    resona,  # Resona: a recurrent model that reads chunks retrieved from its context
    scout,  # SCOUT: mixer + checkpoint-attention double blocks
)
