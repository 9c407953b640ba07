"""Text that ships with Python (pydoc_data.topics): w8a8 calibration, perplexity and benchmark prompts."""
from __future__ import annotations

from functools import lru_cache

from kvloom.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_token_ids(tokenizer: Tokenizer, max_tokens: int = 200_000) -> list[int]:
    text = corpus_text()
    # Encoding the whole corpus is slow; ~4 characters a token is plenty of margin.
    return tokenizer.encode(text[: max_tokens * 6])[:max_tokens]


def prompts_of_length(tokenizer: Tokenizer, lengths: list[int]) -> list[list[int]]:
    """One prompt per length, each a different stretch of the corpus (not random ids)."""
    ids = corpus_token_ids(tokenizer)
    prompts, offset = [], 0
    for n in lengths:
        if n > len(ids):
            raise ValueError(f"a {n}-token prompt is longer than the corpus ({len(ids)} tokens)")
        if offset + n > len(ids):
            offset = 0
        prompts.append(ids[offset:offset + n])
        offset += n
    return prompts
