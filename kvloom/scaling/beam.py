"""Beam search over forked KV: each beam is one sample of an n-family; a continuation other than the one a
beam drew forks it (copy-on-write, no KV copied) and replaces its last, still uncomputed token; beams that fall
out are aborted (their blocks freed).

The selection follows transformers' beam search (generate(num_beams=W, do_sample=False, length_penalty=...),
early_stopping False) step for step, so in the float32 reference mode both give the same sequences: per step
the top 2W continuations over all beams by summed logprob; those of the first W that end (EOS, or the length
limit) enter the finished set scored sum / generated_length ** length_penalty; the best W that do not end
run on; the search stops once W are finished and the best running beam's sum / length ** length_penalty
cannot beat the worst of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.sampler import TokenLogprobs
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.search import Placement, SearchProgram, SearchResult, raise_failed, run_searches

MAX_BEAM_WIDTH = 10        # the 2W candidates per beam come from the sampler's top logprobs (at most 20)
MAX_LENGTH_PENALTY = 10
_ENDED = -1.0e9            # transformers' score of a continuation that ended (never runs on)


@dataclass
class Beam:
    sample_id: str
    tokens: list[int]
    score: float             # sum of the tokens' logprobs
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)   # kept when asked for


@dataclass
class Hypothesis:
    score: float             # sum / generated_length ** length_penalty
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None


@dataclass
class BeamSearch:
    """One prompt's search state; pure bookkeeping (BeamProgram runs the engine)."""
    width: int
    length_penalty: float
    max_tokens: int | None   # set once the prompt's length is known (the engine's context caps it)
    eos_ids: frozenset
    running: list[Beam]
    top_logprobs: int | None = None    # the request's logprobs: each hypothesis keeps its tokens' top ones
    finished: list[Hypothesis] = dataclasses.field(default_factory=list)   # best first
    open: bool = True
    generated: int = 0
    done: bool = False

    def select(self, tops: dict[str, list[tuple[int, float]]]) -> list[tuple[Beam, int, float, TokenLogprobs | None]]:
        """Given each running beam's top next tokens (id, logprob; at least 2W), the next running beams as
        (parent beam, token, summed logprob, the token's logprobs entry), best first; records finished
        hypotheses; sets done."""
        w = self.width
        cands = sorted(((b.score + lp, i, t, self._entry(t, lp, tops[b.sample_id]))
                        for i, b in enumerate(self.running) for t, lp in tops[b.sample_id][:2 * w]),
                       key=lambda c: (-c[0], c[1], c[2]))[:2 * w]
        last = self.generated + 1 >= self.max_tokens
        ends = [last or t in self.eos_ids for _, _, t, _ in cands]
        if self.open:
            norm = (self.generated + 1) ** self.length_penalty
            new = [self._hypothesis(s / norm, self.running[i], t, e)
                   for (s, i, t, e), end in zip(cands[:w], ends[:w]) if end]
            self.finished = sorted(self.finished + new, key=lambda f: -f.score)[:w]
        ranked = sorted(range(len(cands)), key=lambda j: -(cands[j][0] + (_ENDED if ends[j] else 0.0)))[:w]
        nxt = [(self.running[cands[j][1]], cands[j][2], cands[j][0], cands[j][3]) for j in ranked if not ends[j]]
        self.generated += 1
        if len(self.finished) == w and nxt:
            self.open = nxt[0][2] / self.generated ** self.length_penalty > self.finished[-1].score
        self.done = not nxt or not self.open or all(ends)
        return nxt

    def _entry(self, token: int, lp: float, top: list[tuple[int, float]]) -> TokenLogprobs | None:
        return None if self.top_logprobs is None else TokenLogprobs(token, lp, top[:self.top_logprobs])

    def _hypothesis(self, score: float, beam: Beam, token: int, entry: TokenLogprobs | None) -> Hypothesis:
        return Hypothesis(score, beam.tokens + [token], None if entry is None else beam.logprobs + [entry])

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]


def check_beam_settings(width: int, n: int, length_penalty: float, params: SamplingParams, max_num_seqs: int) -> None:
    if not isinstance(width, int) or not 1 <= width <= MAX_BEAM_WIDTH:
        raise InvalidRequestError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {width!r}",
                                  field="beam_width")
    if width > max_num_seqs:
        raise InvalidRequestError(f"beam_width {width} exceeds max_num_seqs {max_num_seqs}", field="beam_width")
    if n > width:
        raise InvalidRequestError(f"n ({n}) must be <= beam_width ({width})", field="n")
    # (bounded: length ** length_penalty must stay a finite, non-zero float at any context length)
    if (not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool)
            or not -MAX_LENGTH_PENALTY <= length_penalty <= MAX_LENGTH_PENALTY):
        raise InvalidRequestError(f"length_penalty must be a number in [-{MAX_LENGTH_PENALTY}, "
                                  f"{MAX_LENGTH_PENALTY}], got {length_penalty!r}", field="length_penalty")
    if params.stop_strings or params.stop_token_ids or params.structured_outputs is not None or params.needs_penalties:
        raise InvalidRequestError("beam search takes no stop strings, stop_token_ids, penalties or output "
                                  "constraints", field="use_beam_search")


def beam_search(engine: Engine, prompts: list, params: SamplingParams, width: int, length_penalty: float = 1.0,
                id_prefix: str = "beam") -> list[list[tuple[float, list[int]]]]:
    """Per prompt, its best params.n hypotheses (score, token ids) best first; all prompts' beams run batched."""
    programs = [BeamProgram(p, params, width, length_penalty, f"{id_prefix}-{i}") for i, p in enumerate(prompts)]
    run_searches(engine, programs)
    return [[(h.score, h.tokens) for h in p.search.best(params.n)] for p in programs]


class BeamProgram(SearchProgram):
    """One prompt's beam search over the engine (offline: run_searches; served: AsyncEngine.run_search).

    After each step, the beams that drew wait paused until every beam of the search has drawn (one preempted
    or left out of a full step catches up), then the selection moves the samples to the next beams."""

    def __init__(self, prompt, params: SamplingParams, width: int, length_penalty: float = 1.0,
                 request_id: str = "beam", placement: Placement = Placement()):
        self.prompt, self.params, self.width, self.length_penalty = prompt, params, width, length_penalty
        self.request_id, self.placement = request_id, placement
        self.search: BeamSearch | None = None
        self.tops: dict[str, list[tuple[int, float]]] = {}   # this step's draws: beam sample -> top tokens
        self.tokens_drawn = 0
        self.first: RequestOutput | None = None             # the first output (prompt ids, cached tokens)

    def start(self, engine: Engine) -> None:
        check_beam_settings(self.width, self.params.n, self.length_penalty, self.params, engine.config.max_num_seqs)
        self.tokenizer = engine.tokenizer
        beam_params = dataclasses.replace(self.params, n=1, temperature=0.0, seed=None, ignore_eos=True,
                                          logprobs=max(2 * self.width, self.params.logprobs or 0))
        rid = self.placement.add(engine, self.prompt, beam_params, self.request_id)
        eos = frozenset() if self.params.ignore_eos else frozenset(engine.tokenizer.eos_token_ids)
        self.search = BeamSearch(self.width, float(self.length_penalty), None, eos, [Beam(rid, [], 0.0)],
                                 self.params.logprobs)
        self.max_model_len = engine.max_model_len

    def owns(self, parent_id: str) -> bool:
        return parent_id == self.request_id

    def advance(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        raise_failed(outputs)
        search = self.search
        running = {b.sample_id for b in search.running}
        for out in outputs:
            if out.request_id not in running or not out.logprobs:
                continue
            if self.first is None:
                self.first = out
                room = self.max_model_len - len(out.prompt_token_ids)
                search.max_tokens = min(self.params.max_tokens or room, room)
            self.tops[out.request_id] = out.logprobs[-1].top
            self.tokens_drawn += 1
            if not out.finished:
                engine.pause_sample(out.request_id)    # its next token waits for the selection
        if len(self.tops) < len(search.running):
            return
        _advance(engine, search, self.tops)
        self.tops = {}
        for b in search.running:
            engine.unpause_sample(b.sample_id)
        if search.done:
            self.close(engine)
            self.done = True

    def close(self, engine: Engine) -> None:
        engine.abort_request(self.request_id)       # every beam's sample: they are one family

    def result(self) -> SearchResult:
        hyps = self.search.best(self.params.n) if self.search is not None else []
        choices = [self._output(j, h) for j, h in enumerate(hyps)]
        return SearchResult(choices, {"strategy": "beam_search", "beam_width": self.width,
                                      "length_penalty": self.length_penalty, "scores": [h.score for h in hyps],
                                      "completion_tokens": self.tokens_drawn}, self.tokens_drawn)

    def _output(self, index: int, h: Hypothesis) -> RequestOutput:
        text = self.tokenizer.decode(h.tokens, skip_special_tokens=self.params.skip_special_tokens)
        stop = bool(h.tokens) and h.tokens[-1] in self.search.eos_ids
        return RequestOutput(
            request_id=f"{self.request_id}#beam{index}", parent_id=self.request_id, index=index,
            prompt_token_ids=self.first.prompt_token_ids, delta_text=text, delta_token_ids=list(h.tokens),
            delta_logprobs=h.logprobs, text=text, token_ids=list(h.tokens), logprobs=h.logprobs, finished=True,
            finish_reason="stop" if stop else "length", stop_reason=h.tokens[-1] if stop else None,
            num_cached_tokens=self.first.num_cached_tokens, cumulative_logprob=None if h.logprobs is None else
            sum(e.logprob for e in h.logprobs))


def _advance(engine: Engine, search: BeamSearch, tops: dict) -> None:
    """Select the next beams, then move the engine's samples to them: each old beam's sample goes on as its
    first continuation (its drawn token replaced when another was chosen), further continuations fork it,
    and beams with none are aborted (after the forks: a fork needs its source)."""
    nxt = search.select(tops)
    if search.done:
        return
    drawn = {b.sample_id: tops[b.sample_id][0][0] for b in search.running}
    taken: set[str] = set()
    # a beam whose drawn token was chosen keeps its sample as is; other continuations fork or reuse one
    order = sorted(range(len(nxt)), key=lambda j: nxt[j][1] != drawn[nxt[j][0].sample_id])
    placed: dict[int, Beam] = {}
    for j in order:
        parent, token, score, entry = nxt[j]
        sid = parent.sample_id
        if sid not in taken and token == drawn[sid]:
            taken.add(sid)
            placed[j] = _child(sid, parent, token, score, entry)
    spare = [b.sample_id for b in search.running if all(p.sample_id != b.sample_id for p, _, _, _ in nxt)]
    for j in order:
        if j in placed:
            continue
        parent, token, score, entry = nxt[j]
        sid = parent.sample_id
        if sid not in taken:          # its own sample, with another token than the drawn one
            taken.add(sid)
            target = sid
        else:
            target = engine.fork_sample(sid)
        engine.set_last_token(target, token)
        placed[j] = _child(target, parent, token, score, entry)
    for sid in spare:
        engine.abort_sample(sid)
    search.running = [placed[j] for j in range(len(nxt))]


def _child(sample_id: str, parent: Beam, token: int, score: float, entry: TokenLogprobs | None) -> Beam:
    return Beam(sample_id, parent.tokens + [token], score, parent.logprobs + [entry] if entry is not None else [])
