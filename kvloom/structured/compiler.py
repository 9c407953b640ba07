"""Grammars compiled off the engine thread and cached by constraint.

A compiled grammar is a prototype matcher (llguidance builds its lexer lazily, so the first mask is computed
here too); each request takes a deep copy. Compiling runs in a small thread pool (llguidance drops the GIL
while it builds), so a request whose grammar is not ready waits in the engine without holding up others.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from kvloom.errors import InvalidRequestError
from kvloom.structured.backend import build_tokenizer, validate
from kvloom.structured.spec import StructuredOutputs


class GrammarCompiler:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids, max_cached: int = 256, workers: int = 2):
        self.vocab_size = max(vocab_size, len(hf_tokenizer))   # the library's (and the masks') width
        self._hf, self._eos = hf_tokenizer, set(eos_ids)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvloom-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._max = max_cached
        self._tokenizer: Future | None = None
        self.hits = self.misses = 0

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:   # built by the first compile, on a worker (never the engine thread)
                self._tokenizer = Future()
                build = True
            else:
                build = False
        if build:
            try:
                self._tokenizer.set_result(build_tokenizer(self._hf, self.vocab_size, self._eos))
            except BaseException as e:
                self._tokenizer.set_exception(e)
        return self._tokenizer.result()

    def submit(self, spec: StructuredOutputs) -> Future:
        """The prototype matcher's future (done at once when cached). Its exception is InvalidRequestError
        naming the field for a constraint the library rejects."""
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._cache[key] = self._pool.submit(self._compile, spec)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return fut

    def _compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        text = validate(spec)
        matcher = llguidance.LLMatcher(self._lltokenizer(), text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {spec.field}: {matcher.get_error()}", field=spec.field)
        mask = torch.empty((self.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)   # builds the lazy lexer states
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {spec.field}: {matcher.get_error()}", field=spec.field)
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
