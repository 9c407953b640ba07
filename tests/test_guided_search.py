"""Particle filtering over forked KV (kvloom/scaling/guided.py): resampling forks and aborts samples, the
population follows the scorer, nothing leaks."""
from __future__ import annotations

import math
import random

import pytest
from conftest import random_prompts
from test_scaling_engine import engine  # noqa: F401 - the shared engine fixture (checks for leaks)

from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.guided import ParticleProgram, ParticleSearch, particle_filter
from kvloom.scaling.search import run_searches


def test_systematic_resampling_keeps_the_population_size_and_follows_the_weights():
    search = ParticleSearch(particles=8, temperature=1.0)
    rng = random.Random(0)
    assert search.resample([0.0] * 8, rng) == [1] * 8
    assert search.resample([50.0] + [0.0] * 7, rng) == [8] + [0] * 7
    copies = search.resample([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], rng)
    assert sum(copies) == 8 and copies[0] + copies[3] >= 4


def test_particles_follow_the_scorer_and_free_their_blocks(engine):  # noqa: F811
    """The scorer prefers the text with the most "e"s; at a low temperature every particle of the next round
    descends from the best-scored one, so the finished particles all share the last round's winner's tokens."""
    prompt = random_prompts(1, [20], seed=8)[0]
    def es(p, text):
        return 100.0 * text.count("e") + sum(map(ord, text)) * 1e-6     # (ties unlikely)

    params = SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)
    program = ParticleProgram(prompt, params, es, ParticleSearch(particles=4, step_tokens=4, temperature=0.01,
                                                                 seed=1), request_id="pf")
    run_searches(engine, [program])
    finished = program.ranked()
    assert program.rounds == 2 and len(finished) == 4         # resampled at 4 and 8 tokens; 4 finish at 12
    heads = {tuple(out.token_ids[:8]) for _, out in finished}
    assert len(heads) == 1                                     # one winner of round 2 left descendants
    assert finished == sorted(finished, key=lambda f: -f[0])
    assert all(len(out.token_ids) == 12 for _, out in finished)


def test_particle_filter_checks_its_settings(engine):  # noqa: F811
    with pytest.raises(InvalidRequestError):
        particle_filter(engine, [5, 6, 7], SamplingParams(temperature=0), lambda p, t: 0.0, ParticleSearch())
    with pytest.raises(InvalidRequestError):
        particle_filter(engine, [5, 6, 7], SamplingParams(), lambda p, t: 0.0, ParticleSearch(particles=0))


def test_llm_generate_guided(tiny_model_dir):
    from kvloom import LLM
    llm = LLM(tiny_model_dir("llama"), kv_cache_memory="4MiB")
    prompt = random_prompts(1, [10], seed=2)[0]
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=9, ignore_eos=True)
    got = llm.generate([prompt], params, guided={"particles": 4, "step_tokens": 3}, scorer=lambda p, t: len(t))[0]
    assert len(got.outputs) == 2 and got.kvloom["rounds"] == 2 and got.kvloom["particles_finished"] == 4
    assert got.kvloom["scores"] == sorted(got.kvloom["scores"], reverse=True)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    with pytest.raises(InvalidRequestError):
        llm.generate([prompt], params, guided={"particles": 4, "k": 1}, scorer=lambda p, t: 0.0)


def test_process_reward_reads_the_positive_replys_probability():
    from kvloom.engine.outputs import RequestOutput
    from kvloom.engine.sampler import TokenLogprobs
    from kvloom.scaling.process_reward import ProcessReward

    grader = ProcessReward("q", positive="Yes", _positive_ids=frozenset({7, 9}))
    def graded(top):
        return RequestOutput("g", "g", 0, [1], "", [top[0][0]], None, "", [top[0][0]],
                             [TokenLogprobs(top[0][0], top[0][1], top)], True, "length")
    top = [(5, math.log(0.5)), (7, math.log(0.2)), (9, math.log(0.1)), (3, math.log(0.05))]
    assert grader.read(graded(top)) == pytest.approx(math.log(0.3))          # both spellings of the reply
    assert grader.read(graded([(5, math.log(0.6)), (3, math.log(0.01))])) == math.log(0.01)   # at most that
    # the slots are filled in one pass: an answer that contains "{question}" stays as written
    plain = ProcessReward("Q?", template="{question}|{answer}")

    class Tok:
        class hf:
            chat_template = None
        @staticmethod
        def encode(text):
            return list(text.encode())
    assert bytes(plain.prompt_ids(Tok, "x {question}")) == b"Q?|x {question}\n"


@pytest.mark.parametrize("value,field", [
    ("judge", "guided_search.scorer"), ({"template": "no slot"}, "guided_search.scorer.template"),
    ({"positive": " "}, "guided_search.scorer.positive"), ({"k": 1}, "guided_search.scorer"),
    ({"name": "other"}, "guided_search.scorer.name")])
def test_process_reward_settings_are_checked(value, field):
    from kvloom.scaling.process_reward import ProcessReward
    with pytest.raises(InvalidRequestError) as e:
        ProcessReward.from_field(value, "q")
    assert e.value.field == field
