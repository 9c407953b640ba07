"""The request mix of `kvloom bench soak`: what each request asks for and how its client behaves.

Prompts are stretches of the corpus (text that ships with Python). Lengths near and past the context
are measured with the server's own /tokenize, so "near the context" is exact and "past it" is sure.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

from kvloom.corpus import corpus_text

FINISH_REASONS = frozenset({"stop", "length"})
STOPS = (["\n"], ".", [". ", "\n\n"], ["the"], ["Python", "def ", ":"], "END")


@dataclass
class SoakRequest:
    endpoint: str                     # chat | completions
    body: dict
    behaviour: str                    # plain | disconnect | abort | burst | invalid
    prompt_size: str                  # short | medium | long | near_context | over_context
    disconnect_after: int | None = None   # streams: SSE data events read before the client hangs up
    abort_after: float | None = None      # seconds before the client gives up (non-streaming)
    expect_status: tuple = ()             # invalid requests: the 4xx they must get

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def n(self) -> int:
        n = self.body.get("n", 1)
        return n if isinstance(n, int) and n > 0 else 1

    @property
    def top_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs must carry (None: no logprobs asked for)."""
        if self.endpoint == "chat":
            return (self.body.get("top_logprobs") or 0) if self.body.get("logprobs") else None
        return self.body.get("logprobs")

    @property
    def include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    @property
    def tags(self) -> list[str]:
        """What this request exercises, for the report's coverage table."""
        b = self.body
        t = [self.prompt_size, f"n={self.n}", "greedy" if b.get("temperature") == 0 else "sampled"]
        for tag, on in (("logprobs", self.top_logprobs is not None), ("stop", b.get("stop")), ("seed", "seed" in b),
                        ("include_usage", self.include_usage), ("echo", b.get("echo")),
                        ("ignore_eos", b.get("ignore_eos")), ("token_id_prompt", isinstance(b.get("prompt"), list)),
                        ("multi_message", len(b.get("messages") or ()) > 1)):
            if on:
                t.append(tag)
        return t

    @property
    def kind(self) -> str:
        return f"{self.endpoint}/{'stream' if self.stream else 'json'}/{self.behaviour}"


@dataclass
class PromptPool:
    text: str
    chars_per_token: float
    max_model_len: int
    ids: list[int]                                   # a tokenized stretch of the corpus, > the context
    near_chat: list[str] = field(default_factory=list)   # user messages templated to 80-97% of the context
    over_chat: list[str] = field(default_factory=list)   # user messages templated past the context

    def text_of(self, rng: random.Random, tokens: int) -> str:
        chars = max(8, int(tokens * self.chars_per_token))
        start = rng.randrange(0, max(1, len(self.text) - chars))
        return self.text[start:start + chars]

    def ids_of(self, rng: random.Random, tokens: int) -> list[int]:
        start = rng.randrange(0, len(self.ids) - tokens + 1)
        return self.ids[start:start + tokens]


async def _count(h: httpx.AsyncClient, base: str, model: str, **body) -> dict:
    r = await h.post(base + "/tokenize", json={"model": model, **body})
    r.raise_for_status()
    return r.json()


async def build_pool(h: httpx.AsyncClient, base: str, model: str, max_model_len: int, rng: random.Random,
                     count: int = 3) -> PromptPool:
    """A few near-context and past-context chat prompts, measured; completions use token ids (exact)."""
    text = corpus_text()
    # Characters per token vary along the corpus (prose, code, tables): size text prompts by the densest of
    # a few stretches, so a "long" one never runs into the context.
    step = max(1, (len(text) - 4000) // 8)
    cpt = min([4000 / max(1, (await _count(h, base, model, prompt=text[i:i + 4000]))["count"])
               for i in range(0, 8 * step, step)])
    # 1.5x the context in ids (room for a past-context prompt at several offsets); the sparsest text has
    # ~2.5x fewer tokens per character than the densest.
    want = int(1.5 * max_model_len) + 64
    while len(text) < want * cpt * 2.5:           # a context longer than the corpus: repeat it
        text += "\n\n" + corpus_text()
    ids = (await _count(h, base, model, prompt=text[:int(want * cpt * 2.5)]))["tokens"]
    if len(ids) <= max_model_len + 32:
        raise RuntimeError(f"the corpus tokenizes to {len(ids)} tokens, too few for a {max_model_len}-token context")
    pool = PromptPool(text, cpt, max_model_len, ids)
    for _ in range(count):
        target = int(rng.uniform(0.85, 0.95) * max_model_len)
        start, chars = rng.randrange(len(text) // 2), int(target * cpt)
        for _attempt in range(6):   # scale the stretch by what the server counts, until it lands in range
            content = text[start:start + chars]
            n = (await _count(h, base, model, messages=[{"role": "user", "content": content}]))["count"]
            if 0.80 * max_model_len <= n <= 0.97 * max_model_len:
                pool.near_chat.append(content)
                break
            chars = int(chars * target / max(1, n))
        over = pool.text_of(rng, int(1.6 * max_model_len))
        if (await _count(h, base, model, messages=[{"role": "user", "content": over}]))["count"] > max_model_len:
            pool.over_chat.append(over)
    return pool


class RequestMix:
    """Draws requests: the steady traffic of the workers (next) and the short ones of a burst (burst)."""

    def __init__(self, pool: PromptPool, model: str, rng: random.Random):
        self.pool, self.model, self.rng = pool, model, rng
        self.serial = 0

    def _sizes(self) -> dict[str, tuple[int, int]]:
        ctx = self.pool.max_model_len
        return {"short": (4, max(8, min(64, ctx // 10))),
                "medium": (max(9, min(64, ctx // 10)), max(16, min(512, ctx * 3 // 10))),
                "long": (max(17, min(512, ctx * 3 // 10)), max(32, min(2048, ctx // 2)))}

    def _prompt_tokens(self, size: str) -> int:
        lo, hi = self._sizes()[size]
        return self.rng.randint(lo, hi)

    def _sampling(self, body: dict) -> None:
        r = self.rng
        body["temperature"] = 0.0 if r.random() < 0.4 else round(r.uniform(0.2, 1.3), 2)
        if r.random() < 0.5:
            body["seed"] = r.randrange(2**31)
        if r.random() < 0.2:
            body["top_p"] = 0.9
        if r.random() < 0.1:
            body["top_k"] = 20
        if r.random() < 0.1:
            body["presence_penalty"], body["frequency_penalty"] = 0.5, 0.3
        if r.random() < 0.25:
            body["stop"] = r.choice(STOPS)
        if r.random() < 0.15:
            body["ignore_eos"] = True
        x = r.random()
        body["max_tokens"] = r.randint(2, 48) if x < 0.7 else r.randint(48, 160) if x < 0.95 else r.randint(160, 400)
        body["n"] = r.choices((1, 2, 3, 4), (60, 15, 10, 15))[0]

    def _chat_messages(self, content: str) -> list[dict]:
        r = self.rng.random()
        if r < 0.6:
            return [{"role": "user", "content": content}]
        if r < 0.8:
            return [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": content}]
        return [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi. What do you need?"},
                {"role": "user", "content": content}]

    def _body(self, endpoint: str, size: str, stream: bool) -> dict:
        r, pool = self.rng, self.pool
        self.serial += 1
        body: dict = {"model": self.model, "stream": stream}
        if endpoint == "chat":
            if size == "near_context" and pool.near_chat:   # measured as the only message: sent so
                body["messages"] = [{"role": "user", "content": r.choice(pool.near_chat)}]
            else:   # a serial at the end: every prompt differs, prefixes are still shared now and then
                body["messages"] = self._chat_messages(pool.text_of(r, self._prompt_tokens(size))
                                                       + f" [{self.serial}]")
        elif size == "near_context":
            body["prompt"] = pool.ids_of(r, int(r.uniform(0.85, 0.97) * pool.max_model_len))
        elif r.random() < 0.2:
            body["prompt"] = pool.ids_of(r, self._prompt_tokens(size))
        else:
            body["prompt"] = pool.text_of(r, self._prompt_tokens(size)) + f" [{self.serial}]"
        self._sampling(body)
        if r.random() < 0.25:
            k = r.randint(0, 5)
            body.update({"logprobs": True, "top_logprobs": k} if endpoint == "chat" else {"logprobs": k})
        if stream and r.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if endpoint == "completions" and r.random() < 0.05:
            body["echo"] = True
        return body

    def next(self) -> SoakRequest:
        r = self.rng
        endpoint = r.choice(("chat", "completions"))
        if r.random() < 0.03:
            return self._invalid(endpoint)
        stream = r.random() < 0.5
        size = r.choices(("short", "medium", "long", "near_context"), (52, 35, 12.5, 0.5))[0]
        if size == "near_context" and endpoint == "chat" and not self.pool.near_chat:
            size = "long"        # no chat prompt could be measured into range (completions use exact ids)
        req = SoakRequest(endpoint, self._body(endpoint, size, stream), "plain", size)
        if stream and r.random() < 0.2:
            req.behaviour, req.disconnect_after = "disconnect", r.randint(0, 5)
        elif not stream and r.random() < 0.15:
            req.behaviour, req.abort_after = "abort", round(r.uniform(0.05, 3.0), 3)
        return req

    def burst(self) -> SoakRequest:
        endpoint = self.rng.choice(("chat", "completions"))
        body = self._body(endpoint, "short", self.rng.random() < 0.5)
        body["max_tokens"] = self.rng.randint(2, 32)
        body["n"] = self.rng.choice((1, 1, 2))
        return SoakRequest(endpoint, body, "burst", "short")

    def _invalid(self, endpoint: str) -> SoakRequest:
        """A request the server must refuse with a 4xx and an error body."""
        r, pool = self.rng, self.pool
        body = self._body(endpoint, "short", r.random() < 0.5)
        body.pop("logprobs", None)
        body.pop("top_logprobs", None)
        choice = r.choice(("over_context", "model", "n", "max_tokens", "logprobs"))
        status, size = (400,), "short"
        if choice == "over_context":
            size = "over_context"
            if endpoint == "chat" and pool.over_chat:
                body["messages"] = [{"role": "user", "content": r.choice(pool.over_chat)}]
            else:
                body.pop("messages", None)
                endpoint = "completions"
                body["prompt"] = pool.ids_of(r, pool.max_model_len + r.randint(1, 32))
        elif choice == "model":
            body["model"], status = "no-such-model", (404,)
        elif choice in ("n", "max_tokens"):
            body[choice] = 0
        elif endpoint == "chat":
            body["top_logprobs"] = 3                     # without logprobs=true
        else:
            body["logprobs"] = r.randint(6, 9)           # completions allow 0-5
        return SoakRequest(endpoint, body, "invalid", size, expect_status=status)
