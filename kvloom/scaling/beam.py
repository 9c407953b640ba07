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
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10        # the 2W candidates per beam come from the sampler's top logprobs (at most 20)
_ENDED = -1.0e9            # transformers' score of a continuation that ended (never runs on)


@dataclass
class Beam:
    sample_id: str
    tokens: list[int]
    score: float             # sum of the tokens' logprobs


@dataclass
class BeamSearch:
    """One prompt's search state; pure bookkeeping (the driver runs the engine)."""
    width: int
    length_penalty: float
    max_tokens: int
    eos_ids: frozenset
    running: list[Beam]
    finished: list[tuple[float, list[int]]] = dataclasses.field(default_factory=list)   # best first
    open: bool = True
    generated: int = 0
    done: bool = False

    def select(self, tops: dict[str, list[tuple[int, float]]]) -> list[tuple[Beam, int, float]]:
        """Given each running beam's top 2W next tokens (id, logprob), the next running beams as
        (parent beam, token, summed logprob), best first; records finished hypotheses; sets done."""
        w = self.width
        cands = sorted(((b.score + lp, i, t) for i, b in enumerate(self.running) for t, lp in tops[b.sample_id]),
                       key=lambda c: (-c[0], c[1], c[2]))[:2 * w]
        last = self.generated + 1 >= self.max_tokens
        ends = [last or t in self.eos_ids for _, _, t in cands]
        if self.open:
            norm = (self.generated + 1) ** self.length_penalty
            new = [(s / norm, self.running[i].tokens + [t]) for (s, i, t), e in zip(cands[:w], ends[:w]) if e]
            self.finished = sorted(self.finished + new, key=lambda f: -f[0])[:w]
        ranked = sorted(range(len(cands)), key=lambda j: -(cands[j][0] + (_ENDED if ends[j] else 0.0)))[:w]
        nxt = [(self.running[cands[j][1]], cands[j][2], cands[j][0]) for j in ranked if not ends[j]]
        self.generated += 1
        if len(self.finished) == w and nxt:
            self.open = nxt[0][2] / self.generated ** self.length_penalty > self.finished[-1][0]
        self.done = not nxt or not self.open or all(ends)
        return nxt

    def best(self, n: int) -> list[tuple[float, list[int]]]:
        return self.finished[:n]


def check_beam_settings(width: int, n: int, length_penalty: float, params: SamplingParams, max_num_seqs: int) -> None:
    if not isinstance(width, int) or not 1 <= width <= MAX_BEAM_WIDTH:
        raise InvalidRequestError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {width!r}",
                                  field="beam_width")
    if width > max_num_seqs:
        raise InvalidRequestError(f"beam_width {width} exceeds max_num_seqs {max_num_seqs}", field="beam_width")
    if n > width:
        raise InvalidRequestError(f"n ({n}) must be <= beam_width ({width})", field="n")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise InvalidRequestError(f"length_penalty must be a number, got {length_penalty!r}", field="length_penalty")
    if params.stop_strings or params.stop_token_ids or params.structured_outputs is not None or params.needs_penalties:
        raise InvalidRequestError("beam search takes no stop strings, stop_token_ids, penalties or output "
                                  "constraints", field="use_beam_search")
    if params.max_tokens is None:
        raise InvalidRequestError("beam search needs max_tokens", field="max_tokens")


def beam_search(engine: Engine, prompts: list, params: SamplingParams, width: int, length_penalty: float = 1.0,
                id_prefix: str = "beam") -> list[list[tuple[float, list[int]]]]:
    """Per prompt, its best params.n hypotheses (score, token ids) best first; all prompts' beams run batched."""
    check_beam_settings(width, params.n, length_penalty, params, engine.config.max_num_seqs)
    beam_params = dataclasses.replace(params, n=1, temperature=0.0, seed=None, logprobs=2 * width, ignore_eos=True)
    searches: dict[str, BeamSearch] = {}
    owner: dict[str, str] = {}            # sample id -> its search's family id
    try:
        for i, prompt in enumerate(prompts):
            rid = engine.add_request(prompt, beam_params, request_id=f"{id_prefix}-{i}")
            searches[rid] = BeamSearch(width, float(length_penalty), params.max_tokens,
                                       frozenset(engine.tokenizer.eos_token_ids), [Beam(rid, [], 0.0)])
            owner[rid] = rid
        tops: dict[str, dict[str, list[tuple[int, float]]]] = {rid: {} for rid in searches}
        while engine.has_unfinished():
            for out in engine.step():
                family = owner.get(out.request_id)
                if family is None or searches[family].done:
                    continue
                if out.logprobs:             # this step's draw: the beam's top 2W next tokens
                    tops[family][out.request_id] = out.logprobs[-1].top
            for family, search in searches.items():
                if search.done or len(tops[family]) < len(search.running):
                    continue
                _advance(engine, search, tops[family], owner, family)
                tops[family] = {}
                if search.done:
                    for b in search.running:
                        engine.abort_sample(b.sample_id)
                    search.running = []
    finally:
        for rid in searches:
            engine.abort_request(rid)
    return [s.best(params.n) for s in searches.values()]


def _advance(engine: Engine, search: BeamSearch, tops: dict, owner: dict, family: str) -> None:
    """Select the next beams, then move the engine's samples to them: each old beam's sample goes on as its
    first continuation (its drawn token replaced when another was chosen), further continuations fork it,
    and beams with none are aborted (after the forks: a fork needs its source)."""
    nxt = search.select(tops)
    if search.done:
        return
    drawn = {b.sample_id: tops[b.sample_id][0][0] for b in search.running}
    taken: set[str] = set()
    running = []
    # a beam whose drawn token was chosen keeps its sample as is; other continuations fork or reuse one
    order = sorted(range(len(nxt)), key=lambda j: nxt[j][1] != drawn[nxt[j][0].sample_id])
    placed: dict[int, Beam] = {}
    for j in order:
        parent, token, score = nxt[j]
        sid = parent.sample_id
        if sid not in taken and token == drawn[sid]:
            taken.add(sid)
            placed[j] = Beam(sid, parent.tokens + [token], score)
    spare = [b.sample_id for b in search.running if all(p.sample_id != b.sample_id for p, _, _ in nxt)]
    for j in order:
        if j in placed:
            continue
        parent, token, score = nxt[j]
        sid = parent.sample_id
        if sid not in taken:          # its own sample, with another token than the drawn one
            taken.add(sid)
            target = sid
        else:
            target = engine.fork_sample(sid)
            owner[target] = family
        engine.set_last_token(target, token)
        placed[j] = Beam(target, parent.tokens + [token], score)
    for sid in spare:
        engine.abort_sample(sid)
    search.running = [placed[j] for j in range(len(nxt))]
