"""Shared fixtures: tiny random Llama-family models saved as safetensors in a tmp dir.

No test downloads anything: tokenizers are trained here on text that ships
with Python, models are built from transformers' config classes.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

VOCAB = 384
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


def build_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, 400_000, 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def make_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama3-rope":
        return LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32})
    raise ValueError(arch)


def save_tiny_model(directory: str, arch: str, seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **overrides))
    model.save_pretrained(directory)
    build_tokenizer(directory)
    return directory


def tiny_gemma3_config(sliding_window: int = 16):
    from transformers import Gemma3TextConfig

    # Local RoPE default, global RoPE linearly scaled, final soft-capping on: every option the model reads.
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, sliding_window=sliding_window,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], query_pre_attn_scalar=24,
        final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def save_tiny_gemma3(directory: str, sliding_window: int = 16) -> str:
    """A tiny random Gemma 3 (3 sliding-window layers, then a global one) as safetensors with a tokenizer."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_gemma3_config(sliding_window))
    with torch.no_grad():   # the init leaves norms at w = 0 (a multiplier of 1): give them something to do
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path maker: tiny_model_dir('llama' | 'llama3-rope' | 'qwen2' | 'qwen3')."""
    made: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in made:
            made[arch] = save_tiny_model(str(tmp_path_factory.mktemp(f"tiny-{arch}")), arch)
        return made[arch]
    return get


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: transformers generate(do_sample=False), one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def hf_gguf_reference(path: str):
    """(tokenizer, model) from transformers loading a GGUF file, fp32; generate() runs through EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate through EOS, as ignore_eos does
    return tok, model


def random_prompts(n: int, lengths: list[int] | None = None, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(3, 60, (n,), generator=g)]
    return [torch.randint(5, vocab, (L,), generator=g).tolist() for L in lengths[:n]]


def make_adapter(base_dir: str, out_dir: str, seed: int, rank: int, alpha: float, targets: list[str],
                 rslora: bool) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():   # large enough deltas that each adapter's greedy tokens differ from the base model's
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out_dir)
    return out_dir
