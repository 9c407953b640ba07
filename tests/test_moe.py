"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy outputs equal transformers' token for token,
and a request's tokens do not depend on its batch or its chunking; the grouping by expert equals a per-token loop."""
import pytest
import torch

from conftest import VOCAB, build_tokenizer, hf_greedy, random_prompts
from kvloom import LLM, SamplingParams
from kvloom.bench.moe import per_token_experts
from kvloom.errors import KvloomError, UnsupportedArchitectureError, WeightsError
from kvloom.models.moe import GroupedExperts
from kvloom.models.moe_routing import group_by_expert, route

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, initializer_range=0.1)


def _config(arch: str):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if arch == "mixtral":      # 8 experts, top-2, softmax -> top-k -> renormalise
        return MixtralConfig(**_COMMON, num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen2-moe":    # a shared expert with its sigmoid gate, top-k weights not renormalised, a dense layer
        return Qwen2MoeConfig(**{**_COMMON, "num_hidden_layers": 3}, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                              mlp_only_layers=[1])
    if arch == "qwen3-moe":    # q/k norm, renormalised top-3 (a sum whose order matters), every other layer sparse
        return Qwen3MoeConfig(**{**_COMMON, "num_hidden_layers": 4, "head_dim": 32}, num_experts=6,
                              num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                              decoder_sparse_step=2)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            directory = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(directory)
            build_tokenizer(directory)
            made[arch] = directory
        return made[arch]
    return get


def _generate(llm: LLM, prompts) -> list[list[int]]:
    out = [r.token_ids for r in llm.generate(prompts, GREEDY)]
    assert llm.engine.pool.num_free == llm.engine.num_blocks, "KV blocks leaked"
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_greedy_matches_transformers(moe_dir, arch):
    model_dir = moe_dir(arch)
    prompts = random_prompts(6, [5, 17, 33, 1, 48, 9])
    want = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    llm = LLM(model_dir, quantization="none")
    assert _generate(llm, prompts) == want
    assert len({tuple(w) for w in want}) > 1, "degenerate reference: every prompt gave the same output"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe"])
def test_alone_batched_and_chunked_agree(moe_dir, arch):
    """A request's tokens: the same alone, in a batch of mixed prompts (its tokens grouped with theirs by
    expert), and with its prompt in 8-token chunks fused with other requests' decodes."""
    model_dir = moe_dir(arch)
    prompts = random_prompts(8, [40, 3, 27, 11, 55, 6, 19, 33], seed=5)
    llm = LLM(model_dir)
    batched = _generate(llm, prompts)
    alone = [_generate(llm, [p])[0] for p in prompts]
    chunked = _generate(LLM(model_dir, max_num_batched_tokens=8), prompts)
    assert batched == alone    # `alone` reran prompts whose blocks the batch left in the prefix cache
    assert chunked == alone
    if arch == "mixtral":      # draft trees verified through the sparse layers: the same tokens
        spec = LLM(model_dir, speculative="lookahead", enable_prefix_caching=False)
        assert _generate(spec, prompts) == alone
        assert spec.engine.speculator.stats()["proposed"] > 0, "no draft was verified: nothing tested"
    assert alone == hf_greedy(model_dir, prompts, GREEDY.max_tokens)


def test_grouping_equals_per_token_loop():
    torch.manual_seed(1)
    num_experts, top_k, tokens = 8, 3, 37
    experts = GroupedExperts(num_experts, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(tokens, 64)
    logits = torch.randn(tokens, num_experts)
    logits[:, 7] = -30.0          # an expert nobody chooses
    weights, chosen = route(logits, top_k, normalize=True)
    assert torch.equal(chosen, chosen.sort(dim=-1).values), "each token's experts in ascending order"
    assert torch.allclose(weights.sum(-1), torch.ones(tokens))
    probs = logits.softmax(-1)
    assert torch.equal(chosen, probs.topk(top_k).indices.sort(-1).values)

    groups = group_by_expert(chosen, num_experts)
    assert [e for e, _, _ in groups.spans] == sorted({int(e) for e in chosen.flatten()}) and 7 not in \
        [e for e, _, _ in groups.spans]
    flat = chosen.flatten()
    for e, lo, hi in groups.spans:   # one contiguous run per expert, its tokens in order, nothing else in it
        assert (flat[groups.order[lo:hi]] == e).all()
        assert groups.tokens[lo:hi].tolist() == sorted(groups.tokens[lo:hi].tolist())
    assert sorted(groups.order.tolist()) == list(range(tokens * top_k))

    with torch.inference_mode():
        got = experts(x, weights, chosen)
        want = per_token_experts(experts, x, weights, chosen)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        # a token's result does not depend on the others: alone (every expert run on one row) it is the same
        for t in (0, 17, 36):
            alone = experts(x[t:t + 1], weights[t:t + 1], chosen[t:t + 1])
            assert torch.allclose(alone[0], got[t], rtol=1e-5, atol=1e-6)


def test_unsupported_modes_fail_clearly(moe_dir):
    model_dir = moe_dir("qwen2-moe")
    for scheme in ("int8", "int4", "w8a8"):
        with pytest.raises(KvloomError, match="mixture-of-experts"):
            LLM(model_dir, quantization=scheme)
    with pytest.raises(KvloomError, match="mixture-of-experts"):
        LLM(model_dir, enable_lora=True)


def test_paths_named(moe_dir):
    from kvloom.kernels import kernels
    from kvloom.system_info import inference_paths

    llm = LLM(moe_dir("mixtral"))
    paths = inference_paths(llm.engine)
    assert any("grouped by expert" in k for k in paths["linear_kernels"])
    if kernels() is not None:   # the native stack would have run these decodes: it says why it does not
        assert "mixture-of-experts" in paths["inactive_backends"]["decode-stack"]
    assert llm.engine.runner.decode_stack is None


def test_missing_expert_weight_is_refused(moe_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from kvloom.models.loader import load_model
    from kvloom.models.model_source import resolve_model

    src = moe_dir("mixtral")
    for name in ("config.json",):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    tensors = load_file(f"{src}/model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="experts.5.w3"):
        load_model(resolve_model(str(tmp_path)), torch.float32)


def test_moe_gguf_refused(tmp_path):
    """GGUF MoE files are not mapped yet: the loader says so instead of failing on a tensor name."""
    from types import SimpleNamespace
    from unittest import mock

    from kvloom.models import loader

    cfg = _config("mixtral")
    source = SimpleNamespace(gguf_file="m.gguf", gguf_path=str(tmp_path / "m.gguf"), directory=str(tmp_path))
    with mock.patch.object(loader, "open_gguf", return_value=SimpleNamespace(tensors=[])), \
            mock.patch.object(loader, "load_hf_config", return_value=cfg):
        with pytest.raises(UnsupportedArchitectureError, match="safetensors only"):
            loader.load_model(source, torch.float32)
