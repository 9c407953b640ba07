"""Lookahead speculation: the trie, the tree mask, greedy exactness everywhere, sampling distribution."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from conftest import hf_greedy, random_prompts
from kvloom import LLM, SamplingParams
from kvloom.engine.request import Request
from kvloom.speculation.guard import PROBE_EVERY, WARM, SpeculationGuard
from kvloom.speculation.lookahead import LookaheadSpeculator, SpecSettings
from kvloom.kernels import kernels
from kvloom.speculation.ngram_trie import NativeNGramTrie, NGramTrie
from kvloom.speculation.step_cost import StepCost
from kvloom.speculation.tree_attention import tree_depths, tree_mask, tree_visibility_bits

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _repetitive_prompts(n, seed):
    """Prompts that repeat a span of themselves, so drafts from the request's own trie get accepted."""
    out = []
    for p in random_prompts(n, [24] * n, seed=seed):
        out.append(p + p[:8] + p + p[:12])
    return out


def _spec(model, **kw):
    """Lookahead with a flat cost model (a pass costs the same at any size, chunks are free) and its timing
    guard always agreeing, so drafts are always worth proposing: on a tiny model the measured costs and step
    times would often say they are not, and these tests are about tokens, not speed."""
    llm = LLM(model, speculative="lookahead", **kw)
    llm.engine.speculator.step_cost = StepCost([1, 64], [1.0, 1.0])
    llm.engine.speculator.guard.allows = lambda rows: True
    return llm


def test_trie_counts_continuations_and_grows_incrementally():
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3]
    whole = NGramTrie(4)
    whole.extend(seq)
    grown = NGramTrie(4)
    active = grown.extend(seq[:5])
    grown.extend(seq, 5, active)
    assert grown.num_nodes == whole.num_nodes
    tree = whole.draft([9, 1, 2], max_tokens=4, max_match=3, max_branches=2)
    # After "1 2": "3" twice, "4" once; the likelier branch comes first and continues with "1".
    assert tree.tokens == [3, 1, 4, 1] and tree.parents == [-1, 0, -1, 2]
    assert whole.draft([9, 9], 4, 3, 2) is None


def test_trie_removal_takes_back_exactly_what_was_added():
    t = NGramTrie(5)
    t.extend([1, 2, 3, 4, 5, 1, 2])
    before = t.num_nodes
    t.extend([7, 1, 2, 3, 9, 9, 9])
    t.extend([7, 1, 2, 3, 9, 9, 9], delta=-1)
    assert t.num_nodes == before == _count(t.root) - 1
    assert t.draft([1, 2, 3], 3, 2, 1).tokens == [4, 5, 1]


def _count(node):
    return 1 + sum(_count(c) for c in node.children.values())


@pytest.mark.skipif(kernels() is None, reason="native kernels are turned off (KVLOOM_NO_KERNELS)")
def test_native_trie_counts_and_drafts_as_the_python_one():
    """The C++ trie against the Python one: streams fed in random pieces, documents added and taken back (the
    global trie's bound), and drafts for every suffix length, branching and size, on a small vocabulary so
    that n-grams repeat."""
    g = torch.Generator().manual_seed(7)
    ref, native = NGramTrie(6), NativeNGramTrie(6, kernels())
    stream = torch.randint(0, 12, (400,), generator=g).tolist()
    ref_active = native_active = None
    fed = 0
    while fed < len(stream):
        upto = min(len(stream), fed + int(torch.randint(1, 9, (), generator=g)))
        ref_active = ref.extend(stream[:upto], fed, ref_active)
        native_active = native.extend(stream[:upto], fed, native_active)
        fed = upto
        assert native.num_nodes == ref.num_nodes
    docs = [torch.randint(0, 12, (int(n),), generator=g).tolist() for n in torch.randint(2, 60, (30,), generator=g)]
    for i, doc in enumerate(docs):
        for trie in (ref, native):
            trie.extend(doc)
            if i % 3 == 2:
                trie.extend(docs[i - 2], delta=-1)
        assert native.num_nodes == ref.num_nodes
    assert ref.num_nodes == _count(ref.root) - 1
    drafts = 0
    for end in range(1, len(stream), 7):
        context = stream[:end]
        for max_tokens, max_match, branches in ((1, 1, 1), (4, 2, 2), (8, 3, 2), (12, 5, 3)):
            want = ref.draft(context, max_tokens, max_match, branches)
            got = native.draft(context, max_tokens, max_match, branches)
            assert (got is None) == (want is None)
            if want is not None:
                assert (got.tokens, got.parents) == (want.tokens, want.parents)
                drafts += 1
    assert drafts > 100
    assert native.draft([99, 98], 4, 3, 2) is None


def test_global_trie_stays_within_its_node_bound():
    spec = LookaheadSpeculator(SpecSettings(global_max_nodes=2000), StepCost([1], [1.0]))
    g = torch.Generator().manual_seed(0)
    for k in range(40):
        req = Request(f"r{k}", [1, 2, 3], SamplingParams(), 100, 0.0, None)
        for t in torch.randint(0, 50, (60,), generator=g).tolist():
            req.append_output(t)
        spec.finish(req)
        assert spec.global_trie.num_nodes <= 2000
        assert spec.global_trie.num_nodes == _count(spec.global_trie.root) - 1
    assert spec.global_trie.num_nodes > 700    # it holds the recent requests (~600 nodes each), not nothing


def test_draft_allotment_follows_the_cost_model():
    """Cheap extra tokens: drafts go out, likeliest requests first. Costly chunks: none at all."""
    reqs = []
    for k in range(3):
        r = Request(f"r{k}", [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], SamplingParams(temperature=0.0), 50, 0.0, None)
        r.append_output(3)
        reqs.append(r)
    cheap = LookaheadSpeculator(SpecSettings(max_tokens=4), StepCost([1, 64], [1.0, 1.0]))
    trees = cheap.propose([(r, 10) for r in reqs], base_tokens=3, base_yield=3, budget=100)
    assert set(trees) == {"r0", "r1", "r2"} and all(len(t) == 4 for t in trees.values())
    assert trees["r0"].tokens[:3] == [4, 1, 2]                  # the request's own text, continued
    costly = LookaheadSpeculator(SpecSettings(max_tokens=4), StepCost([1, 64], [1.0, 1.0], per_chunk=5.0))
    assert costly.propose([(r, 10) for r in reqs], base_tokens=3, base_yield=3, budget=100) == {}
    linear = LookaheadSpeculator(SpecSettings(max_tokens=4), StepCost([1, 64], [1.0, 64.0]))
    assert linear.propose([(r, 10) for r in reqs], base_tokens=3, base_yield=3, budget=100) == {}


def test_skipping_drafts_that_cannot_pay_changes_no_decision(monkeypatch):
    """The bound that skips drafting (lookahead._cannot_pay) only skips what the full search would reject: on
    random cost curves, batch sizes and acceptance estimates both give the same drafts."""
    import random

    from kvloom.speculation import lookahead

    rng = random.Random(0)
    full_search = lambda *args: False   # noqa: E731 - the search as it was, drafting every candidate
    skipped = 0
    for case in range(200):
        sizes = [1, 2, 4, 8, 16, 32, 64]
        seconds, t = [], rng.uniform(5, 50)
        for _ in sizes:
            t += rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 40)])
            seconds.append(t)
        cost = StepCost(sizes, seconds, per_chunk=rng.choice([0.0, rng.uniform(0, 10)]))
        batch, num_requests = rng.randint(1, 40), rng.randint(1, 4)
        outcomes = []
        for bound in (True, False):
            spec = LookaheadSpeculator(SpecSettings(max_tokens=4), cost)
            reqs = []
            for k in range(num_requests):
                r = Request(f"r{k}", [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], SamplingParams(temperature=0.0), 50, 0.0, None)
                r.append_output(3)
                reqs.append(r)
                st = spec._state(r)
                st.hits, st.misses = (case % 7) / 7 + 0.05, 1.0
            if not bound:
                monkeypatch.setattr(lookahead, "_cannot_pay", full_search)
            trees = spec.propose([(r, 10) for r in reqs], base_tokens=batch, base_yield=batch, budget=100)
            monkeypatch.undo()
            outcomes.append({rid: (tree.tokens, tree.parents) for rid, tree in trees.items()})
        assert outcomes[0] == outcomes[1], case
        skipped += not outcomes[0]
    assert 20 < skipped < 180, skipped      # both outcomes occur


def test_guard_takes_turns_then_follows_the_faster_kind_and_probes():
    guard = SpeculationGuard()
    turns = []
    for _ in range(2 * WARM):            # untrusted averages: drafted and plain steps alternate
        allowed = guard.allows(20)
        turns.append(allowed)
        guard.record(20, allowed, 40 if allowed else 20, 0.1)   # drafted: 400 tok/s, plain: 200 tok/s
    assert turns == [True, False] * WARM
    assert all(guard.allows(21) for _ in range(50))           # 21 rows share 20's bucket: drafting wins
    slow = SpeculationGuard()
    for _ in range(WARM):
        slow.record(33, True, 40, 0.2)   # drafted: 200 tok/s
        slow.record(33, False, 32, 0.1)  # plain: 320 tok/s
    allowed = [slow.allows(33) for _ in range(3 * PROBE_EVERY)]
    assert allowed.count(True) == 3 and allowed[PROBE_EVERY - 1] and not allowed[0]   # one probe in 16
    assert slow.allows(2) and slow.stats()["32"]["plain_steps"] == WARM     # other sizes are judged apart


def test_guard_stops_drafting_that_measures_slower_and_tokens_stay_the_same(tiny_model_dir):
    """Drafted passes made slow on purpose: the engine stops drafting at that batch size (but for the
    turns and probes), and the tokens are those of plain decoding."""
    import time

    model = tiny_model_dir("llama")
    prompts = _repetitive_prompts(4, seed=70)
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    want = [r.token_ids for r in LLM(model).generate(prompts, params)]
    llm = LLM(model, speculative="lookahead")
    llm.engine.speculator.step_cost = StepCost([1, 64], [1.0, 1.0])   # the curve always says "draft"
    runner = llm.engine.runner
    execute = runner.execute

    def slow_when_drafted(plan, *args, **kwargs):
        if any(c.num_draft_tokens for c in plan.chunks):
            time.sleep(0.05)
        return execute(plan, *args, **kwargs)
    runner.execute = slow_when_drafted
    assert [r.token_ids for r in llm.generate(prompts, params)] == want
    seen = llm.engine.speculator.stats()["guard"]["4"]
    assert seen["plain_steps"] > 60 and seen["drafted_tokens_per_s"] < seen["plain_tokens_per_s"], seen
    assert seen["drafted_steps"] <= WARM + seen["plain_steps"] // (PROBE_EVERY - 1) + 1, seen


def test_drafts_ride_only_in_steps_of_plain_decodes(tiny_model_dir):
    """Beside a prompt chunk a drafted decode ran as a chunk of its own on the module path, slower than the
    tokens it won (docs/performance.md, fifteenth sitting): such steps carry no drafts; steps of decodes do."""
    model = tiny_model_dir("llama")
    llm = _spec(model, max_num_batched_tokens=16)   # long prompts in chunks, beside the others' decodes
    plans = []
    schedule = llm.engine.scheduler.schedule
    llm.engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    prompts = _repetitive_prompts(3, seed=66) + random_prompts(3, [60] * 3, seed=67)
    params = [SamplingParams(temperature=0.0, max_tokens=40 if i < 3 else 8, ignore_eos=True) for i in range(6)]
    for p, sp in zip(prompts, params):
        llm.engine.add_request(p, sp)
    while llm.engine.has_unfinished():
        llm.engine.step()
    drafted = [p for p in plans if any(c.num_draft_tokens for c in p.chunks)]
    mixed = [p for p in plans if p.decodes and any(not c.num_draft_tokens for c in p.spans)]
    assert drafted and mixed     # both kinds of step happened
    assert all(c.num_draft_tokens for p in drafted for c in p.spans)
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_tree_mask_and_depths():
    parents = [-1, 0, 1, -1, 3, 0]
    assert tree_depths(parents) == [1, 2, 3, 1, 2, 2]
    m = tree_mask(parents)
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[5].tolist() == [True, False, False, False, False, True]
    bits = tree_visibility_bits(parents)   # bit d: the slot d before the token's own
    for i in range(len(parents)):
        assert [bool((bits[i] >> (i - j)) & 1) for j in range(i + 1)] == m[i, :i + 1].tolist()
        assert (bits[i] >> (i + 1)) == -1   # everything before the drafts (the context) stays visible


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_speculation_matches_transformers(tiny_model_dir, arch):
    model = tiny_model_dir(arch)
    prompts = _repetitive_prompts(5, seed=60) + random_prompts(5, seed=61)
    want = hf_greedy(model, prompts, GREEDY.max_tokens)
    llm = _spec(model)
    # EOS ends a request as in transformers, also when it arrives among several accepted tokens.
    assert [r.token_ids for r in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40))] == want
    stats = llm.engine.speculator.stats()
    assert stats["accepted"] > 20, stats       # speculation really ran and was accepted
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_speculation_stays_exact_with_chunking_preemption_prefix_caching_and_int8_kv(tiny_model_dir):
    model = tiny_model_dir("llama")
    shared = random_prompts(1, [40], seed=62)[0]
    prompts = _repetitive_prompts(6, seed=63) + [shared + p for p in random_prompts(4, seed=64)]
    plain = [r.token_ids for r in LLM(model).generate(prompts, GREEDY)]
    chunked = _spec(model, max_num_batched_tokens=16)
    assert [r.token_ids for r in chunked.generate(prompts, GREEDY)] == plain
    small = _spec(model, kv_cache_memory=24 * 16 * 512, max_num_batched_tokens=32)   # 24 blocks
    assert [r.token_ids for r in small.generate(prompts, GREEDY)] == plain
    assert small.engine.scheduler.num_preemptions > 0
    cached = _spec(model)
    cached.generate(prompts[-4:], GREEDY)                                           # warm the prefix cache
    assert [r.token_ids for r in cached.generate(prompts, GREEDY)] == plain
    assert cached.engine.prefix_cache.hits > 0
    int8_plain = [r.token_ids for r in LLM(model, kv_cache_dtype="int8").generate(prompts, GREEDY)]
    int8 = _spec(model, kv_cache_dtype="int8")
    assert [r.token_ids for r in int8.generate(prompts, GREEDY)] == int8_plain
    for llm in (chunked, small, cached, int8):
        assert llm.engine.speculator.stats()["accepted"] > 0
        assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_stop_inside_accepted_drafts_truncates_there(tiny_model_dir):
    model = tiny_model_dir("llama")
    prompts = _repetitive_prompts(4, seed=65)
    ref = [r.token_ids for r in LLM(model).generate(prompts, GREEDY)]
    # Stop at the 15th token of each output: it may arrive in the middle of several accepted tokens.
    for p, r in zip(prompts, ref):
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[r[14]])
        got = _spec(model).generate([p], params)[0].token_ids
        assert got == r[:r.index(r[14]) + 1]
    short = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    assert [o.token_ids for o in _spec(model).generate(prompts, short)] == [r[:7] for r in ref]


def _sample_tokens(llm, prompt, n, params, wave=32):
    """n independent samples: no per-request seed, so each request takes the next of the engine's seeds. In
    waves that start together, so that most steps are decodes alone (the steps that draft)."""
    out = []
    for start in range(0, n, wave):
        out += [o.token_ids for o in llm.generate([prompt] * min(wave, n - start), SamplingParams(**params))]
    return out


def _chi2_p(a, b, position):
    cats = sorted({x[position] for x in a} | {x[position] for x in b})
    table = np.array([[sum(x[position] == c for x in s) for c in cats] for s in (a, b)])
    keep = table.sum(0) >= 10                  # pool rare tokens so every cell has a fair expectation
    table = np.concatenate([table[:, keep], table[:, ~keep].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    return chi2_contingency(table)[1]


def _over_accepting_verify(logits, tree, req):
    """A deliberately wrong verifier for the power check: accepts a draft with probability 2 p(d)."""
    from kvloom.engine.sampler import target_probs
    tokens, path, node = [], [], -1
    while True:
        probs = target_probs(logits[node + 1].float(), req.params)
        probs = probs / probs.sum()
        kids = [i for i, p in enumerate(tree.parents) if p == node]
        nxt = next((c for c in kids if float(torch.rand((), generator=req.generator)) < 2 * probs[tree.tokens[c]]),
                   None)
        if nxt is None:
            tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
            return tokens, path
        tokens.append(tree.tokens[nxt])
        path.append(nxt)
        node = nxt


@pytest.mark.timeout(600)
def test_sampling_with_speculation_keeps_the_model_distribution(tiny_model_dir, monkeypatch):
    """Rejection sampling is lossless: token frequencies with and without speculation agree (chi-square),
    while the same test catches a verifier that over-accepts drafts (it has the power to see a bias)."""
    model = tiny_model_dir("llama")
    prompt = _repetitive_prompts(1, seed=66)[0]
    params = dict(temperature=0.7, top_k=6, max_tokens=4, ignore_eos=True)
    n = 1500
    roomy = dict(max_num_seqs=32, max_num_batched_tokens=4096)     # budget left over for drafts
    plain = _sample_tokens(LLM(model, seed=1), prompt, n, params)
    spec_llm = _spec(model, seed=2, **roomy)
    spec = _sample_tokens(spec_llm, prompt, n, params)
    stats = spec_llm.engine.speculator.stats()
    assert stats["accepted"] > 200 and stats["proposed"] > stats["accepted"], stats   # both outcomes happen
    for pos in (1, 2, 3):
        assert _chi2_p(plain, spec, pos) > 0.001, pos
    monkeypatch.setattr("kvloom.engine.model_runner.verify", _over_accepting_verify)
    biased = _sample_tokens(_spec(model, seed=3, **roomy), prompt, n, params)
    assert min(_chi2_p(plain, biased, pos) for pos in (1, 2, 3)) < 0.001
