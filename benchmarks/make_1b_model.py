"""Writes a random-initialised model with Llama-3.2-1B's shapes, for comparisons where decode is memory-bound.

    python benchmarks/make_1b_model.py OUT_DIR [--seed 0] [--layers 16]

OUT_DIR gets:
  safetensors/   config.json, model.safetensors (bf16, as Llama-3.2-1B ships), tokenizer files
  llama1b-Q4_0.gguf, llama1b-Q8_0.gguf   the same weights, projections in Q4_0 / Q8_0 (gguf's own quantizer)

Shapes: hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, vocabulary 128,256, tied
embeddings (1.24 B parameters). No weights are downloaded: the tokenizer is the default model's
(SmolLM2's BPE, 49,152 tokens) with reserved tokens up to 128,256 so the embedding and LM head have
Llama-3.2-1B's size; RoPE is plain (theta 500,000, no llama3 frequency scaling), which costs the same.
The embedding (and so the tied LM head) is Q8_0 in both files, as llama.cpp keeps an output table
above 4 bits; every other 2-D weight is the file's type, norms float32.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 2048, 16, 32, 8, 64, 8192, 128256
ROPE_THETA, EPS, CONTEXT = 500000.0, 1e-5, 8192


def random_weights(seed: int, layers: int) -> dict[str, np.ndarray]:
    """Hugging Face names -> float32 arrays [out, in], std 0.02 (Llama's initializer); norms 1."""
    rng = np.random.default_rng(seed)

    def w(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
    out = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
                p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
                p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
                p + "mlp.gate_proj.weight": w(MLP, HIDDEN),
                p + "mlp.up_proj.weight": w(MLP, HIDDEN),
                p + "mlp.down_proj.weight": w(HIDDEN, MLP)}
    return out


def hf_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
            "max_position_embeddings": CONTEXT, "rms_norm_eps": EPS, "rope_theta": ROPE_THETA,
            "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def _gguf_names(name: str) -> str:
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"


def _permute_for_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k (its RoPE pairs neighbours); kvloom's loader undoes it."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, weights: dict[str, np.ndarray], type_name: str, layers: int, template: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    src = gguf.GGUFReader(template)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"random Llama-3.2-1B shapes {type_name}")
    writer.add_block_count(layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type_name])
    # The default model's BPE tokenizer, padded with reserved control tokens to Llama-3.2-1B's vocabulary.
    tokens = [bytes(src.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in src.fields["tokenizer.ggml.tokens"].data]
    types = [int(src.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in src.fields["tokenizer.ggml.token_type"].data]
    merges = [bytes(src.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8")
              for i in src.fields["tokenizer.ggml.merges"].data]
    extra = VOCAB - len(tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens + [f"<|reserved_{i}|>" for i in range(extra)])
    writer.add_token_types(types + [gguf.TokenType.CONTROL] * extra)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(bytes(src.fields["tokenizer.chat_template"].parts[-1]).decode("utf-8"))
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = _permute_for_gguf(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = _permute_for_gguf(w, KV_HEADS)
        if w.ndim == 1:
            writer.add_tensor(_gguf_names(name), w)
            continue
        qtype = Q.Q8_0 if name == "model.embed_tokens.weight" else Q[type_name]
        writer.add_tensor(_gguf_names(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_safetensors(directory: str, weights: dict[str, np.ndarray], layers: int, gguf_path: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    os.makedirs(directory, exist_ok=True)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(layers), f, indent=1)
    AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)).save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick check (tests)")
    ap.add_argument("--types", default="Q4_0,Q8_0")
    ap.add_argument("--no-safetensors", action="store_true")
    args = ap.parse_args()
    from kvloom.models.model_source import default_model_path
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    weights = random_weights(args.seed, args.layers)
    print(f"{sum(w.size for w in weights.values()) / 1e9:.3f} B parameters ({time.perf_counter() - t0:.0f} s)")
    paths = []
    for type_name in args.types.split(","):
        path = os.path.join(args.out_dir, f"llama1b-{type_name}.gguf")
        write_gguf(path, weights, type_name, args.layers, default_model_path())
        paths.append(path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s)")
    if not args.no_safetensors:
        write_safetensors(os.path.join(args.out_dir, "safetensors"), weights, args.layers, paths[0])
        print(f"wrote {args.out_dir}/safetensors ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
