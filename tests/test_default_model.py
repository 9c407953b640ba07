"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""
import pytest
import torch

from conftest import hf_gguf_reference
from kvloom import LLM, SamplingParams
from kvloom.models.model_source import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def reference():
    return hf_gguf_reference(default_model_path())


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_batched_tokens=16, quantization="none")  # reference mode; small budget: chunked prompts


def test_greedy_matches_transformers_32_tokens(llm, reference):
    tok, model = reference
    results = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for prompt, result in zip(PROMPTS, results):
        ids = torch.tensor([tok.encode(prompt)])
        assert result.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                 pad_token_id=tok.eos_token_id)
        assert result.token_ids == gen[0, ids.shape[1]:].tolist(), prompt
        assert len(result.token_ids) == 32
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)


def test_next_token_logits_agree(llm, reference):
    from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput

    tok, model = reference
    ids = tok.encode(PROMPTS[2])
    engine = llm.engine
    blocks = engine.pool.allocate(-(-len(ids) // engine.config.block_size))
    try:
        plan = SchedulerOutput(spans=[ScheduledChunk("probe", ids, 0, blocks, sample=True)])
        ours = engine.runner.logits(plan)[0]
    finally:
        engine.pool.free(blocks)
    with torch.inference_mode():
        theirs = model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0), (ours - theirs).abs().max()


def test_chat_uses_the_template(llm):
    result = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0.0, max_tokens=8))[0]
    prompt_text = llm.tokenizer.decode(result.prompt_token_ids, skip_special_tokens=False)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert result.text and result.finish_reason in ("stop", "length")


def test_a_random_adapter_on_the_default_model_matches_peft(reference, tmp_path):
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    tok, model = reference
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(tmp_path))
    assert isinstance(peft_model, PeftModel)
    llm = LLM(quantization="none", lora_modules={"rand": str(tmp_path)}, kv_cache_memory="256MiB")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            want = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=16, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        base = llm.generate([prompt], params)[0].token_ids
        assert llm.generate([prompt], params, lora="rand")[0].token_ids == want != base, prompt
