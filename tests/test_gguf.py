"""GGUF weights come back under Hugging Face names, dequantised, with llama.cpp's q/k permutation undone."""
import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from kvloom.errors import WeightsError
from kvloom.models.gguf_weights import hf_name, iter_gguf_weights, open_gguf

HEADS, KV_HEADS = 4, 2

# quantisation per tensor kind, with the error it may add
TYPES = {"embed_tokens": ("F16", 1e-3), "q_proj": ("Q8_0", 2e-2), "k_proj": ("Q4_0", 0.2), "v_proj": ("Q4_1", 0.1),
         "o_proj": ("BF16", 1e-2), "mlp": ("F32", 0.0), "norm": ("F32", 0.0), "lm_head": ("Q8_0", 2e-2)}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in table:
        return table[hf]
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer = hf.split(".")[2]
    for k, v in parts.items():
        if f".{k}." in hf:
            return f"blk.{layer}.{v}.weight"
    raise KeyError(hf)


def _kind(name: str) -> str:
    return next(k for k in TYPES if k in name)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    weights = load_file(f"{tiny_model_dir('llama')}/model.safetensors")
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    for name, t in weights.items():
        arr = t.float().numpy()
        if name.endswith("q_proj.weight"):
            arr = _permute(arr, HEADS)
        elif name.endswith("k_proj.weight"):
            arr = _permute(arr, KV_HEADS)
        qtype = gguf.GGMLQuantizationType[TYPES[_kind(name)][0]]
        data = gguf.quants.quantize(np.ascontiguousarray(arr), qtype)
        w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, weights


def test_weights_round_trip(tiny_gguf):
    path, want = tiny_gguf
    got = dict(iter_gguf_weights(open_gguf(path), HEADS, KV_HEADS))
    assert set(got) == set(want)
    for name, w in want.items():
        tol = TYPES[_kind(name)][1]
        err = (got[name] - w.float()).abs().max().item()
        assert got[name].shape == w.shape and err <= tol * max(1.0, w.abs().max().item()), (name, err)


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = open(path, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        list(iter_gguf_weights(open_gguf(str(bad)), HEADS, KV_HEADS))


def test_names():
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_name("blk.1.attn_q.bias") == "model.layers.1.self_attn.q_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None
