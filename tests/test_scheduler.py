"""The scheduler alone, fed hand-made sampled tokens: budget, chunking, preemption, no leaks."""

from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler import Scheduler
from kvloom.kv.block_pool import BlockPool
from kvloom.sampling_params import SamplingParams


def _req(rid, n_prompt, max_tokens=4):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), max_tokens, 0.0, None)


def _drive(sched, max_tokens, max_steps=500):
    """Run like the engine does, with token 7 always 'sampled'; returns the plans."""
    plans = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        plans.append(plan)
        sched.update(plan, {c.request_id: 7 for c in plan.chunks if c.sample})
        for c in plan.chunks:
            r = sched.requests[c.request_id]
            if c.sample and len(r.output_token_ids) >= max_tokens:
                sched.finish(r.request_id, RequestStatus.FINISHED_LENGTH)
    return plans


def test_budget_and_decodes_first():
    pool = BlockPool(100)
    s = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    s.add(_req("a", 3))
    s.add(_req("b", 25))
    plan = s.schedule()
    assert [len(c.token_ids) for c in plan.spans] == [3, 7]  # b's prompt is split
    s.update(plan, {"a": 7})
    plan = s.schedule()
    assert [c.request_id for c in plan.decodes] == ["a"]           # the decode goes first
    assert [len(c.token_ids) for c in plan.spans] == [9]        # b gets the rest of the budget
    assert plan.num_tokens <= 10
    plans = _drive(s, max_tokens=4)
    assert all(p.num_tokens <= 10 for p in plans)
    assert pool.num_free == 100


def test_max_num_seqs_caps_running():
    pool = BlockPool(100)
    s = Scheduler(pool, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        s.add(_req(str(i), 3))
    plan = s.schedule()
    assert len(plan.spans) == 2 and len(s.waiting) == 3
    _drive(s, max_tokens=3)
    assert pool.num_free == 100


def test_preemption_newest_first_and_no_leak():
    pool = BlockPool(6)   # 24 tokens at block size 4
    s = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(3):
        s.add(_req(str(i), 6, max_tokens=8))
    plans = _drive(s, max_tokens=8)
    preempted = [rid for p in plans for rid in p.preempted]
    assert preempted and "0" not in preempted, "the oldest request must never be preempted"
    assert pool.num_free == 6 and not s.requests


def test_abort_frees_blocks_while_waiting_or_running():
    pool = BlockPool(10)
    s = Scheduler(pool, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    s.add(_req("run", 9))
    s.add(_req("wait", 9))
    s.schedule()
    assert pool.num_free < 10
    assert s.finish("wait", RequestStatus.FINISHED_ABORTED) is not None
    assert s.finish("run", RequestStatus.FINISHED_ABORTED) is not None
    assert s.finish("run", RequestStatus.FINISHED_ABORTED) is None
    assert pool.num_free == 10 and not s.has_unfinished()


def test_block_pool_refuses_overdraw_and_double_free():
    pool = BlockPool(3)
    assert pool.allocate(4) is None and pool.num_free == 3
    b = pool.allocate(2)
    pool.free(b)
    try:
        pool.free(b)
        raise AssertionError("double free went unnoticed")
    except RuntimeError:
        pass


def test_forks_never_push_the_running_set_past_max_num_seqs(tiny_model_dir):
    """n=4 with room for 2: the other samples wait (sharing the prompt's blocks) and give the same tokens."""
    from conftest import random_prompts
    from kvloom import LLM, SamplingParams
    prompt = random_prompts(1, [37], seed=31)[0]
    params = SamplingParams(n=4, temperature=0.9, seed=5, max_tokens=12, ignore_eos=True)
    roomy = LLM(tiny_model_dir("llama")).generate([prompt], params)[0]
    tight = LLM(tiny_model_dir("llama"), max_num_seqs=2)
    engine = tight.engine
    engine.add_request(prompt, params, request_id="f")
    outs, most = {}, 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.index] = o.token_ids
        most = max(most, len(engine.scheduler.running))
    assert most == 2
    assert [outs[i] for i in range(4)] == [o.token_ids for o in roomy.outputs]
    assert engine.pool.num_free == engine.pool.num_blocks


def _preq(rid, n_prompt, priority, arrival=0.0, max_tokens=4):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), max_tokens, arrival,
                   None, priority=priority)


def test_priority_orders_admission_then_arrival():
    pool = BlockPool(100)
    s = Scheduler(pool, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    s.add(_preq("late-low", 3, priority=5, arrival=1.0))
    s.add(_preq("early-normal", 3, priority=0, arrival=2.0))
    s.add(_preq("urgent", 3, priority=-1, arrival=3.0))
    s.add(_preq("normal", 3, priority=0, arrival=4.0))
    assert [r.request_id for r in s.waiting] == ["urgent", "early-normal", "normal", "late-low"]
    first = []
    for _ in range(200):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        for c in plan.chunks:
            if c.request_id not in first:
                first.append(c.request_id)
        s.update(plan, {c.request_id: 7 for c in plan.chunks if c.sample})
        for c in plan.chunks:
            r = s.requests[c.request_id]
            if c.sample and len(r.output_token_ids) >= 4:
                s.finish(r.request_id, RequestStatus.FINISHED_LENGTH)
    assert first == ["urgent", "early-normal", "normal", "late-low"]
    assert pool.num_free == 100


def test_urgent_request_preempts_less_urgent_for_a_seat_and_for_blocks():
    # A seat: max_num_seqs is full of priority-0 requests; a priority -1 one arrives.
    pool = BlockPool(100)
    s = Scheduler(pool, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    s.add(_preq("a", 3, 0, 1.0))
    s.add(_preq("b", 3, 0, 2.0))
    s.update(s.schedule(), {"a": 7, "b": 7})
    s.add(_preq("vip", 3, -1, 3.0))
    plan = s.schedule()
    assert plan.preempted == ["b"]                      # the least urgent, newest
    assert "vip" in [c.request_id for c in plan.chunks]
    assert [r.request_id for r in s.waiting] == ["b"]
    # Blocks: the pool is full of low-priority KV.
    pool = BlockPool(4)
    s = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    s.add(_preq("low", 11, 3, 1.0))
    s.update(s.schedule(), {"low": 7})
    assert pool.num_free == 1
    s.add(_preq("vip", 9, -1, 2.0))
    plan = s.schedule()
    assert plan.preempted == ["low"]
    assert plan.chunks[0].request_id == "vip" and len(plan.chunks[0].token_ids) == 9   # its whole prompt
    s.update(plan, {"vip": 7})
    # A request of the same priority never preempts: it waits its turn (the less urgent one yields).
    s.add(_preq("peer", 9, -1, 3.0))
    plan = s.schedule()
    assert "vip" not in plan.preempted and s.requests["vip"].status == RequestStatus.RUNNING
    assert plan.preempted == ["low"]          # low had taken the free block back; peer may have it
    _drive(s, max_tokens=4)
    assert pool.num_free == 4


def test_requests_queued_at_the_front_keep_their_order():
    """A request moved in (front) is not pushed back by requests preempted after it: front-queued requests
    of one priority wait in arrival order, ahead of new ones."""
    s = Scheduler(BlockPool(100), block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    s.add(_preq("new", 3, 0, 1.0))
    s.add(_preq("moved-in", 3, 0, 2.0), front=True)
    s.add(_preq("preempted-later", 3, 0, 3.0), front=True)
    s.add(_preq("older-preempted", 3, 0, 0.5), front=True)
    assert [r.request_id for r in s.waiting] == ["older-preempted", "moved-in", "preempted-later", "new"]
    s.add(_preq("urgent-new", 3, -1, 4.0))
    assert s.waiting[0].request_id == "urgent-new"
