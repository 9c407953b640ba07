"""LoRA adapters (kvloom/lora): peft's adapters served over one base model, many in one batch.

The reference is transformers + peft (PeftModel) on the same tiny random models; adapters are made by peft with
random A and B (peft's default init makes B zero, which would test nothing)."""
import json
import os
import shutil

import pytest
import torch

from conftest import make_adapter, random_prompts
from kvloom import LLM, SamplingParams
from kvloom.errors import InvalidRequestError

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)   # stops at EOS, as generate() does
ADAPTERS = {   # name -> (seed, rank, alpha, target modules, rslora)
    "all": (1, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "attn": (2, 4, 8, ["q_proj", "v_proj"], False),
    "mlp": (3, 16, 8, ["gate_proj", "up_proj", "down_proj", "o_proj"], True),
}


def peft_greedy(base_dir: str, adapter_dir: str | None, prompts: list[list[int]]) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    dirs = {name: make_adapter(base, str(root / name), *spec) for name, spec in ADAPTERS.items()}
    prompts = random_prompts(4, seed=21)
    reference = {name: peft_greedy(base, d, prompts) for name, d in [*dirs.items(), (None, None)]}
    return base, dirs, prompts, reference


def test_each_adapter_equals_peft_and_a_mixed_batch_equals_alone(setup):
    base, dirs, prompts, reference = setup
    assert all(reference[n] != reference[None] for n in ADAPTERS), "an adapter that changes nothing tests nothing"
    llm = LLM(base, lora_modules=dirs, quantization="none", max_loras=4, kv_cache_memory="64MiB")
    for name in [*ADAPTERS, None]:
        got = [r.token_ids for r in llm.generate(prompts, GREEDY, lora=name)]
        assert got == reference[name], name
    # One batch: every prompt with every adapter and the base model, interleaved.
    names = [n for n in [*ADAPTERS, None] for _ in prompts]
    mixed = llm.generate(prompts * 4, GREEDY, lora=names)
    assert [r.token_ids for r in mixed] == [t for n in [*ADAPTERS, None] for t in reference[n]]
    assert llm.engine.pool.num_used == 0


def test_w8a8_is_batch_invariant_with_adapters(setup):
    base, dirs, prompts, _ = setup
    llm = LLM(base, lora_modules=dirs, quantization="w8a8", max_loras=4, kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=2)
    names = [n for n in [*ADAPTERS, None] for _ in prompts]
    alone = [llm.generate([p], params, lora=n)[0] for p, n in zip(prompts * 4, names)]
    mixed = llm.generate(prompts * 4, params, lora=names)
    for a, m in zip(alone, mixed):
        assert a.token_ids == m.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in m.logprobs]   # the same bits
    # The adapters still act under w8a8's smoothing: their outputs are not the base model's.
    base_out = [r.token_ids for r in llm.generate(prompts, GREEDY)]
    assert all([r.token_ids for r in llm.generate(prompts, GREEDY, lora=n)] != base_out for n in ADAPTERS)


def test_more_adapters_than_slots_take_turns(setup):
    base, dirs, prompts, reference = setup
    llm = LLM(base, lora_modules=dirs, quantization="none", max_loras=1, kv_cache_memory="64MiB")
    names = [n for n in ADAPTERS for _ in prompts]
    mixed = llm.generate(prompts * 3, GREEDY, lora=names)
    assert [r.token_ids for r in mixed] == [t for n in ADAPTERS for t in reference[n]]
    assert llm.engine.lora.pins == [0]


def test_prefix_cache_never_shares_blocks_across_adapters(setup):
    base, dirs, _, _ = setup
    llm = LLM(base, lora_modules=dirs, quantization="none", kv_cache_memory="64MiB")
    prompt = random_prompts(1, lengths=[70], seed=5)[0]
    first = llm.generate([prompt], GREEDY, lora="all")[0]
    assert llm.generate([prompt], GREEDY, lora="all")[0].num_cached_tokens >= 64
    assert llm.generate([prompt], GREEDY, lora="attn")[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY, lora="all")[0].token_ids == first.token_ids


def test_load_and_unload_at_run_time(setup, tmp_path):
    base, dirs, prompts, reference = setup
    llm = LLM(base, enable_lora=True, quantization="none", kv_cache_memory="64MiB")
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'all'"):
        llm.generate(prompts, GREEDY, lora="all")
    llm.load_lora("all", dirs["all"])
    assert [r.token_ids for r in llm.generate(prompts, GREEDY, lora="all")] == reference["all"]
    llm.engine.add_request(prompts[0], GREEDY, request_id="busy", lora="all")
    with pytest.raises(InvalidRequestError, match="still has requests"):
        llm.unload_lora("all")
    llm.engine.abort_request("busy")
    llm.unload_lora("all")
    with pytest.raises(InvalidRequestError, match="no LoRA adapter"):
        llm.generate(prompts, GREEDY, lora="all")
    llm.load_lora("all", dirs["attn"])      # the same name, other weights: no stale cached KV answers
    assert [r.token_ids for r in llm.generate(prompts, GREEDY, lora="all")] == reference["attn"]


def _edited(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    edit(str(dst))
    return str(dst)


def test_bad_adapter_directories_are_clear_errors(setup, tmp_path, tiny_model_dir):
    base, dirs, _, _ = setup
    llm = LLM(base, enable_lora=True, max_lora_rank=8, quantization="none", kv_cache_memory="64MiB")

    def set_config(**fields):
        def edit(d):
            path = os.path.join(d, "adapter_config.json")
            config = json.load(open(path))
            config.update(fields)
            json.dump(config, open(path, "w"))
        return edit
    cases = {
        "missing": (str(tmp_path / "nowhere"), "not a directory"),
        "no-config": (_edited(dirs["all"], tmp_path / "a", lambda d: os.remove(os.path.join(d, "adapter_config.json"))),
                      "no adapter_config.json"),
        "no-weights": (_edited(dirs["all"], tmp_path / "b",
                               lambda d: os.remove(os.path.join(d, "adapter_model.safetensors"))),
                       "no adapter_model.safetensors"),
        "rank": (dirs["mlp"], "rank 16 is above this server's --max-lora-rank 8"),
        "dora": (_edited(dirs["all"], tmp_path / "c", set_config(use_dora=True)), "use_dora"),
        "other-model": (_other_model_adapter(tiny_model_dir, tmp_path), "do not fit the base model"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            llm.load_lora(name, path)
    assert llm.engine.lora.adapters == {}


def _other_model_adapter(tiny_model_dir, tmp_path) -> str:
    from conftest import save_tiny_model
    other = save_tiny_model(str(tmp_path / "wide"), "llama", hidden_size=96)
    return make_adapter(other, str(tmp_path / "wide-adapter"), 4, 4, 8, ["q_proj"], False)


def test_server_serves_adapters_by_model_name_and_loads_them_at_run_time(setup):
    import httpx
    import openai
    from server_harness import ServerThread, tiny_engine

    base, dirs, prompts, reference = setup
    engine = tiny_engine(base, quantization="none", lora_modules=(("all", dirs["all"]),), max_loras=2)
    engine.load_lora("attn", dirs["attn"])

    def offline_texts(name):   # the engine's own text for the reference tokens, before the server thread owns it
        for i, p in enumerate(prompts):
            engine.add_request(p, GREEDY, request_id=f"{name}-{i}", lora=name)
        finals = {}
        while engine.has_unfinished():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        assert [finals[f"{name}-{i}"].token_ids for i in range(len(prompts))] == reference[name]
        return [finals[f"{name}-{i}"].text for i in range(len(prompts))]
    want = {name: offline_texts(name) for name in ("all", "attn")}
    engine.unload_lora("attn")
    with ServerThread(engine) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny", "all"} and listed["all"].parent == "tiny"

        def complete(model, prompt):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
            return r.choices[0].text

        assert [complete("all", p) for p in prompts] == want["all"]
        # a stream of one adapter keeps its tokens while another adapter is loaded and a third refused
        stream = client.completions.create(model="all", prompt=prompts[0], max_tokens=MAX_NEW, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "attn", "lora_path": dirs["attn"]})
        assert r.status_code == 200, r.text
        bad = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nowhere"})
        assert bad.status_code == 400 and "not a directory" in bad.json()["error"]["message"]
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
        assert text == want["all"][0]
        assert [complete("attn", p) for p in prompts] == want["attn"]
        assert httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "attn"}).status_code == 200
        gone = httpx.post(s.url + "/v1/completions", json={"model": "attn", "prompt": "hi"})
        assert gone.status_code == 404
        assert engine.pool.num_used == 0


def test_adapters_under_speculation_and_moves_keep_their_tokens(setup):
    from kvloom.config import EngineConfig
    from kvloom.engine.engine import Engine

    base, dirs, prompts, reference = setup
    spec = LLM(base, lora_modules=dirs, quantization="none", speculative="lookahead", kv_cache_memory="64MiB")
    names = [n for n in [*ADAPTERS, None] for _ in prompts]
    mixed = spec.generate(prompts * 4, GREEDY, lora=names)
    assert [r.token_ids for r in mixed] == [t for n in [*ADAPTERS, None] for t in reference[n]]

    def engine(**kw):
        return Engine(EngineConfig(model=base, quantization="none", kv_cache_memory=64 << 20, **kw))
    src, dst, bare = engine(lora_modules=tuple(dirs.items())), engine(lora_modules=tuple(dirs.items())), engine()
    src.add_request(prompts[1], GREEDY, request_id="m", lora="mlp")
    for _ in range(4):
        src.step()
    snap = src.export_request("m")
    with pytest.raises(InvalidRequestError, match="serves no LoRA adapters"):
        bare.import_request(snap)           # refused, and nothing changed there
    assert bare.pool.num_used == 0
    dst.import_request(snap)
    final = None
    while dst.has_unfinished():
        final = next((o for o in dst.step() if o.finished), final)
    assert final.token_ids == reference["mlp"][1]
    assert src.pool.num_used == 0 and dst.lora.pins == [0] * 4


def test_load_and_unload_under_sustained_traffic_disturb_no_other_adapter(setup):
    """Three client threads send requests for two adapters and the base model without pause while a third
    adapter is loaded, used and unloaded over and over, with max_loras=2 so the slots keep changing hands."""
    import threading

    import httpx
    import openai
    from server_harness import ServerThread, tiny_engine

    base, dirs, prompts, reference = setup
    engine = tiny_engine(base, quantization="none", lora_modules=(("all", dirs["all"]), ("mlp", dirs["mlp"])),
                         max_loras=2)
    want = {}
    for name in ("all", "mlp", None, "attn"):
        if name == "attn":
            engine.load_lora("attn", dirs["attn"])
        for i, p in enumerate(prompts):
            engine.add_request(p, GREEDY, request_id=f"{name}-{i}", lora=name)
        while engine.has_unfinished():
            want.update({o.request_id: o.text for o in engine.step() if o.finished})
    engine.unload_lora("attn")
    stop, seen, problems = threading.Event(), {"all": 0, "mlp": 0, None: 0}, []
    with ServerThread(engine) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        def traffic(name):
            k = 0
            while not stop.is_set():
                i = k % len(prompts)
                text = client.completions.create(model=name or "tiny", prompt=prompts[i], max_tokens=MAX_NEW,
                                                 temperature=0).choices[0].text
                if text != want[f"{name}-{i}"]:
                    problems.append((name, i, text))
                seen[name] += 1
                k += 1
        threads = [threading.Thread(target=traffic, args=(n,)) for n in seen]
        for t in threads:
            t.start()
        try:
            for _ in range(5):
                r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "attn", "lora_path": dirs["attn"]})
                assert r.status_code == 200, r.text
                for i, p in enumerate(prompts[:2]):
                    text = client.completions.create(model="attn", prompt=p, max_tokens=MAX_NEW,
                                                     temperature=0).choices[0].text
                    assert text == want[f"attn-{i}"]
                while (r := httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "attn"})).status_code != 200:
                    assert "still has requests" in r.text     # refused while in use; retried
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert not problems and all(n >= 5 for n in seen.values()), (problems, seen)
    assert engine.pool.num_used == 0 and engine.lora.pins == [0, 0]
