"""The pass-key probe: a key hidden in long filler text, asked for at the end, read back greedily.

A KV cache that forgets or blurs distant tokens loses the key first, so it is the long-context check of a cache
that accuracy over short blocks cannot see.
"""

from __future__ import annotations

from typing import Any

import torch

from ryzen_opt.compat import cache_kwargs
from ryzen_opt.errors import ConfigError

PASSKEY_INSTRUCTION = "There is a pass key hidden in the following text. Find it and remember it.\n\n"


PASSKEY_QUESTION = "\n\nWhat is the pass key?"


PASSKEY_ANSWER = "The pass key is"


def passkey_prompt(
    tokenizer: Any, filler: list[str], context_tokens: int, key: str, depth: float = 0.9
) -> torch.Tensor:
    """``[1, ~context_tokens]`` ids: ``filler`` prose with a sentence naming ``key`` planted at ``depth`` (0 = start,
    1 = end), then the question (the pass key retrieval test of Mohtashami & Jaggi 2023). Through the tokenizer's chat
    template when it has one (an instruct model answers a question asked as a user), ending with the answer's start.

    Measured on SmolLM2-135M-Instruct with its full cache: it retrieves the key at 2k and 4k tokens with the needle at
    depth 0.9, and not at 0.25 or 0.5 (2k): a probe of what the cache keeps has to sit where the full-precision model
    passes, so 0.9 is the default.
    """
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    overhead = len(tokenizer(PASSKEY_INSTRUCTION + needle + PASSKEY_QUESTION, add_special_tokens=False)["input_ids"])
    budget = context_tokens - overhead - 16  # the chat template's own tokens and the answer's start
    ids: list[int] = []
    for text in filler:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= budget:
            break
    if len(ids) < budget:
        raise ConfigError(f"passkey_prompt: the filler holds {len(ids)} tokens, fewer than the {budget} needed")
    at = int(budget * depth)
    text = tokenizer.decode(ids[:at]) + needle + tokenizer.decode(ids[at:budget])
    question = PASSKEY_INSTRUCTION + text + PASSKEY_QUESTION
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        full = chat + PASSKEY_ANSWER
    else:
        full = question + "\n" + PASSKEY_ANSWER
    return torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def passkey_probe(model: Any, tokenizer: Any, prompt: torch.Tensor, key: str, make_cache: Any) -> dict[str, Any]:
    """Greedy answer to a :func:`passkey_prompt` through the cache ``make_cache()`` builds: passed when the key is in
    the first tokens generated."""
    ids = prompt.to(next(model.parameters()).device)
    new = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"]) + 2
    out = model.generate(
        ids, **cache_kwargs(make_cache()), max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None
    )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return {"context_tokens": int(ids.shape[1]), "key": key, "answer": answer, "passed": key in answer}
