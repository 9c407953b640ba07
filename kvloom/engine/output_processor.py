"""Per-request output state: detokenised text, stop conditions, streaming hold-back."""
from __future__ import annotations

from kvloom.detokenizer import IncrementalDetokenizer
from kvloom.engine.request import Request
from kvloom.engine.sampler import TokenLogprobs
from kvloom.tokenizer import Tokenizer


class OutputState:
    """Decides when a request is done, and which text is safe to stream.

    Text that might be the start of a stop string is held back until it is
    known not to be one, so a streamed stop string never reaches the client.
    """

    def __init__(self, req: Request, tokenizer: Tokenizer):
        self.req = req
        # A constrained request's EOS comes only when its grammar is complete (structured/matcher.py): it ends
        # the request even with ignore_eos.
        self.eos_ids = (set() if req.params.ignore_eos and req.params.structured_outputs is None
                        else tokenizer.eos_token_ids)
        self.stop_ids = set(req.params.stop_token_ids)
        self.stops = req.params.stop_strings
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
        self.text = ""
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.logprobs: list[TokenLogprobs] | None = [] if req.params.logprobs is not None else None
        self.num_tokens = 0
        # The sum of the chosen tokens' logprobs (raw distribution), kept when logprobs are asked for
        # (logprobs=0 costs one logsumexp a row): best-of and beam search rank samples by it.
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def add_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """Account for the next sampled token (already appended to the request, maybe with later ones)."""
        self.num_tokens += 1
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs.logprob
        if token_id in self.stop_ids or token_id in self.eos_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
        else:
            before = len(self.text)
            self.text += self.detok.push(token_id)
            if self.stops and self._check_stop_strings(before):
                return
        if self.finish_reason is None and self.num_tokens >= self.req.max_tokens:
            self.finish_reason = "length"
            self.text += self.detok.flush()
            self._check_stop_strings(0)

    def _check_stop_strings(self, before: int) -> bool:
        start = max(0, before - self.hold)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) != -1]
        if not hits:
            return False
        idx, s = min(hits)
        self.text = self.text[:idx]
        self.finish_reason, self.stop_reason = "stop", s
        return True

    def take_delta(self) -> tuple[str, list[int], list[TokenLogprobs] | None]:
        """Text and tokens not yet handed out; text is held back while it may begin a stop string."""
        end = len(self.text) if self.finish_reason else max(self.emitted_chars, len(self.text) - self.hold)
        delta_text = self.text[self.emitted_chars:end]
        self.emitted_chars = end
        toks = self.req.output_token_ids[self.emitted_tokens:]
        lps = None if self.logprobs is None else self.logprobs[self.emitted_tokens:]
        self.emitted_tokens = len(self.req.output_token_ids)
        return delta_text, toks, lps

    # ---- portability (engine/snapshot.py) -----------------------------------------------

    _EXPORTED = ("text", "emitted_chars", "emitted_tokens", "logprobs", "num_tokens", "cumulative_logprob")

    def export(self) -> dict:
        d = self.detok
        return {**{k: getattr(self, k) for k in self._EXPORTED},
                "detok_ids": list(d.ids), "detok_prefix_offset": d.prefix_offset, "detok_read_offset": d.read_offset}

    def restore(self, state: dict) -> None:
        """Continue from an exported state (the request's tokens are restored by the caller)."""
        for k in self._EXPORTED:
            setattr(self, k, state[k] if k != "logprobs" or state[k] is None else list(state[k]))
        self.detok.ids = list(state["detok_ids"])
        self.detok.prefix_offset = state["detok_prefix_offset"]
        self.detok.read_offset = state["detok_read_offset"]
