"""Reading model output defensively: reward code never trusts what a model produced."""

from __future__ import annotations


def completion_text(completion) -> str:
    """The text of a completion given as a string or as chat messages; '' for anything else.

    TRL passes conversational completions as `[{"role": "assistant", "content": ...}]`; the
    assistant's last message is the completion. Anything else (None, numbers, bytes, a bare dict,
    a list that holds no message with text) is malformed output: '' scores 0 in every reward.
    Lone surrogates are replaced so the text can always be encoded.
    """
    if isinstance(completion, (list, tuple)):
        contents = [m.get("content") for m in completion if isinstance(m, dict)]
        completion = next((c for c in reversed(contents) if isinstance(c, str)), "")
    if not isinstance(completion, str):
        return ""
    return completion.encode("utf-8", errors="replace").decode("utf-8")
