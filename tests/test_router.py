"""Routing policies on their own: features, the LinUCB bandit on synthetic rewards, the cascade's rule."""
import math

import numpy as np
import pytest

from kvloom.errors import KvloomError
from kvloom.router.bandit import LinUCB
from kvloom.router.cascade import confidence, should_escalate
from kvloom.router.features import query_features, request_text
from kvloom.router.routes import BanditRoute, CascadeRoute, build_routes, parse_route


def test_features_are_cheap_and_bounded():
    code = query_features("def f(x):\n    return x + 1")
    prose = query_features("What is the capital of France?")
    assert code[2] == 1.0 and prose[2] == 0.0 and prose[6] == 1.0
    assert query_features("What is 3 + 4?")[3] == 1.0 and prose[3] == 0.0
    assert query_features("Wie spät ist es, Grüße?")[5] > 0
    for x in (code, prose, query_features(""), query_features("9" * 10_000)):
        assert x[0] == 1.0 and np.all((x >= 0) & (x <= 1))
    assert request_text({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) == "a"
    assert request_text({"prompt": "p"}) == "p"


def _synthetic_run(seed: int, rounds: int = 400):
    """Two arms; 'good' answers code queries well and prose badly, 'cheap' the reverse, each with noise."""
    rng = np.random.default_rng(seed)
    bandit = LinUCB(["cheap", "good"], dim=7, alpha=0.5, seed=seed)
    queries = ["def f(x): return x", "import os\nos.listdir()", "Tell me about rivers.", "Why is the sky blue?"]
    picks = []
    for t in range(rounds):
        text = queries[t % len(queries)]
        x = query_features(text)
        arm, _ = bandit.choose(x)
        is_code = x[2] == 1.0
        mean = {"good": 0.8 if is_code else 0.3, "cheap": 0.3 if is_code else 0.7}[arm]
        bandit.update(arm, x, mean + rng.normal(0, 0.1))
        picks.append((is_code, arm))
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bandit_converges_to_the_better_arm_per_context(seed):
    picks = _synthetic_run(seed)
    last = picks[-100:]
    code_right = sum(1 for c, a in last if c and a == "good") / sum(1 for c, _ in last if c)
    prose_right = sum(1 for c, a in last if not c and a == "cheap") / sum(1 for c, _ in last if not c)
    assert code_right >= 0.95 and prose_right >= 0.95, (code_right, prose_right)


def test_bandit_is_deterministic_with_a_seed():
    assert _synthetic_run(5, 120) == _synthetic_run(5, 120)


def test_bandit_route_reward_is_quality_minus_lambda_cost_and_warm_starts(tmp_path):
    route = BanditRoute(parse_route("r=bandit,lambda=0.5,costs=0+1"), ["small", "big"])
    assert route.reward("small", 0.8) == 0.8 and route.reward("big", 0.8) == pytest.approx(0.3)
    # Offline rows where big is much better on every query: after the warm start the route picks big.
    x = query_features("What is 17 + 25?").tolist()
    rows = [{"arm": "big", "features": x, "quality": 1.0}, {"arm": "small", "features": x, "quality": 0.0}] * 30
    (tmp_path / "rows.json").write_text(__import__("json").dumps(rows))
    warm = BanditRoute(parse_route(f"r=bandit,lambda=0.5,warm={tmp_path / 'rows.json'}"), ["small", "big"])
    assert warm.decide("What is 17 + 25?")[0] == "big"


def test_cascade_escalates_exactly_below_threshold():
    lps = [-0.1, -0.5, -0.9]
    assert confidence(lps) == pytest.approx(-0.5) and confidence(lps, "min_logprob") == -0.9
    assert not should_escalate(lps, -0.5)               # equal: confident enough
    assert should_escalate(lps, -0.5 + 1e-9)
    assert not should_escalate(lps, -0.6)
    assert should_escalate([], -100.0) and confidence([]) == -math.inf
    sure, unsure = [[0.0, -30.0]], [[math.log(0.5), math.log(0.5)]]     # one step each: p = (1, ~0) / (.5, .5)
    assert confidence([-0.1], "neg_entropy", sure) == pytest.approx(0.0, abs=1e-9)
    assert confidence([-0.7], "neg_entropy", unsure) == pytest.approx(-math.log(2))
    assert should_escalate([-0.7], -0.5, "neg_entropy", unsure) and not should_escalate([-0.1], -0.5, "neg_entropy", sure)
    route = CascadeRoute(parse_route("c=cascade,threshold=-0.5"), ["s", "b"])
    assert route.judge(lps)[0] is False and route.judge([-0.6])[0] is True


def test_bad_routes_are_refused():
    for text in ("x", "x=greedy", "x=bandit,arms=a+zz", "x=cascade,small=a,big=a", "x=cascade,threshold=high",
                 "x=bandit,bogus=1", "a=bandit"):
        with pytest.raises(KvloomError):
            build_routes([parse_route(text)], ["a", "b"])


def test_task_set_is_seeded_and_checkable():
    from kvloom.router.tasks import make_tasks
    tasks = make_tasks(8, seed=4)
    assert tasks == make_tasks(8, seed=4) and tasks != make_tasks(8, seed=5)
    add = next(t for t in tasks if t.kind == "add1")
    a, b = (int(x) for x in add.question.split("? ")[0].removeprefix("What is ").split(" + "))
    assert add.check(f"{a} + {b} = {a + b}") and add.check(f"The answer is {a + b}.")
    assert not add.check(f"{a} + {b} = ") and not add.check("no number")
    copy = next(t for t in tasks if t.kind == "copy")
    assert copy.check(copy.answer.capitalize() + ".") and not copy.check(f'The word "{copy.answer}"')


def test_capital_tasks_check_the_capital_as_a_word():
    from kvloom.router.tasks import ALL_KINDS, KINDS, Task, make_tasks
    assert [t.kind for t in make_tasks(5, seed=1, kinds=ALL_KINDS)] == list(ALL_KINDS)
    assert make_tasks(8, seed=4) == make_tasks(8, seed=4, kinds=KINDS)      # the default set is unchanged
    capital = next(t for t in make_tasks(10, seed=2, kinds=("capital",)))
    assert capital.question == f"What is the capital of {capital.question.split(' of ', 1)[1][:-1]}?"
    assert capital.check(capital.answer) and capital.check(f"The capital is {capital.answer.upper()}.")
    tunis = Task("capital", "What is the capital of Tunisia?", "Tunis")
    assert tunis.check("Tunis.") and not tunis.check("Tunisia") and Task("capital", "", "Bogota").check("Bogotá")
    with pytest.raises(ValueError, match="capital"):
        make_tasks(3, kinds=("add1", "poetry"))
