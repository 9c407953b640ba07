"""Fine-tuning while serving (kvloom/finetune): LoRA training equal to peft's, cut into pieces that fill what
inference leaves of each engine step, behind OpenAI's files and fine-tuning routes."""
import json
import re
import time

import pytest
import torch

from conftest import random_prompts
from kvloom import SamplingParams
from kvloom.errors import InvalidRequestError
from kvloom.finetune.dataset import TrainingExample, parse_training_file
from kvloom.finetune.jobs import FineTuningJob, Hyperparameters
from kvloom.finetune.lora_forward import DEFAULT_TARGETS, TrainableLora
from kvloom.finetune.peft_format import save_peft_adapter
from kvloom.finetune.sliced_trainer import TRAIN_CHUNK, SlicedTrainer
from kvloom.models.loader import load_model
from kvloom.models.model_source import resolve_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
ANSWER = " the answer is blue"     # 9 tokens of the tiny tokenizer


def base_model(model_dir):
    model, _ = load_model(resolve_model(model_dir), torch.float32)
    return model


def format_lines(n: int, start: int = 0) -> list[str]:
    """A fixed answer format to learn: every prompt's completion is ANSWER."""
    return [json.dumps({"prompt": f"question {i} about item {i * 7 % 13}", "completion": ANSWER})
            for i in range(start, start + n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_and_gradients_equal_peft(arch, tiny_model_dir, tmp_path):
    """Our layer-by-layer forward and backward against transformers + peft on the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir(arch)
    model = base_model(base)
    lora = TrainableLora(model, 4, 8, DEFAULT_TARGETS, seed=1)
    with torch.no_grad():   # B = 0 would make every gradient of A zero: test nothing
        for _, b in lora.weights.values():
            b.normal_(0, 0.05)
    save_peft_adapter(lora, str(tmp_path / "ad"), base)
    ids = random_prompts(1, [150], seed=4)[0]           # three chunks of TRAIN_CHUNK: gradients cross chunks
    targets = [-100] * 10 + ids[11:] + [-100]
    trainer = SlicedTrainer(model, lora, [TrainingExample(ids, targets)], epochs=1, batch_size=1,
                            learning_rate=0.0, seed=0)
    grads, losses = {}, []
    step = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({key: (a_.grad.clone(), b_.grad.clone()) for key, (a_, b_) in lora.weights.items()})
        return step(*a, **k)
    trainer.optimizer.step = capture
    trainer.on_step = lambda report: losses.append(report.loss)
    trainer.run_to_end()

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                    str(tmp_path / "ad"), is_trainable=True)
    labels = torch.tensor([[-100] + targets[:-1]])      # transformers shifts labels by one itself
    out = ref(input_ids=torch.tensor([ids]), labels=labels)
    out.loss.backward()
    assert losses[0] == pytest.approx(out.loss.item(), rel=1e-5)
    checked = 0
    for name, p in ref.named_parameters():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])", name)
        if m is None:
            continue
        ours = grads[(int(m.group(1)), m.group(2))][0 if m.group(3) == "A" else 1]
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2 * len(lora.weights)


def test_slicing_does_not_change_what_is_learned(tiny_model_dir):
    """A job run one piece at a time (as between inference steps) learns bit-identical weights to one run whole."""
    model = base_model(tiny_model_dir("llama"))
    prompts = random_prompts(5, [40, 150, 70, 130, 20], seed=5)
    examples = [TrainingExample(p, [-100] * 5 + p[6:] + [-100]) for p in prompts]

    def train(sliced):
        lora = TrainableLora(model, 4, 8, ("q_proj", "v_proj", "down_proj"), seed=3)
        trainer = SlicedTrainer(model, lora, examples, epochs=2, batch_size=2, learning_rate=1e-2, seed=7)
        calls = 0
        if sliced:
            while not trainer.done:
                trainer.run(0.0, at_least_one=True)
                calls += 1
        else:
            trainer.run_to_end()
        return lora, calls, trainer.pieces_done

    whole, _, pieces = train(False)
    sliced, calls, _ = train(True)
    # Each call ran one piece (one layer's forward or backward of one chunk, one head chunk, one optimizer
    # step), except the first of each kind, whose cost was not known yet: 4 kinds.
    chunks = sum(-(-len(e.input_ids) // TRAIN_CHUNK) for e in examples)
    assert pieces > 2 * chunks * model.shape.num_layers and pieces - 3 <= calls <= pieces
    for key, (a, b) in whole.weights.items():
        assert torch.equal(a, sliced.weights[key][0]) and torch.equal(b, sliced.weights[key][1]), key
    assert any(b.abs().sum() > 0 for _, b in whole.weights.values())   # something was learned


def test_training_file_errors_name_the_line(tiny_model_dir):
    from kvloom.tokenizer import Tokenizer

    source = resolve_model(tiny_model_dir("llama"))
    tok = Tokenizer.load(source)
    good = json.dumps({"prompt": "a b", "completion": " c"})
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    examples = parse_training_file(f"{good}\n\n{chat}\n".encode(), tok, 512)
    assert len(examples) == 2 and all(e.num_trained > 0 for e in examples)
    # The conversation trains on the assistant's turn only: its tokens, then what the template closes it with.
    reply = tok.hf.encode("yo", add_special_tokens=False)
    trained = [t for t in examples[1].targets if t != -100]
    assert trained[:len(reply)] == reply
    for content, why in [(b"{not json", "line 1: not JSON"),
                         (f'{good}\n{{"prompt": 3}}'.encode(), "line 2"),
                         (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "assistant"),
                         (b"\xff\xfe", "UTF-8"), (b"\n\n", "no examples"),
                         (json.dumps({"prompt": "a " * 600, "completion": "b"}).encode(), "tokens, above")]:
        with pytest.raises(InvalidRequestError, match=why):
            parse_training_file(content, tok, 512)


def test_hyperparameters_are_checked():
    hp = Hyperparameters.parse({"n_epochs": "auto", "batch_size": 2, "lora_rank": 4}, max_rank=8)
    assert (hp.n_epochs, hp.batch_size, hp.lora_rank, hp.lora_alpha) == (3, 2, 4, 8.0)
    for bad, field in [({"lora_rank": 16}, "lora_rank"), ({"n_epochs": 0}, "n_epochs"),
                       ({"batch_size": 1.5}, "batch_size"), ({"target_modules": ["embed"]}, "target_modules"),
                       ({"warmup": 3}, "hyperparameters")]:
        with pytest.raises(InvalidRequestError) as e:
            Hyperparameters.parse(bad, max_rank=8)
        assert field in e.value.field


def run_job(engine, lines, **hp) -> FineTuningJob:
    examples = parse_training_file("\n".join(lines).encode(), engine.tokenizer, engine.max_model_len)
    job = FineTuningJob(FineTuningJob.new_id(), "tiny", "file-x", Hyperparameters.parse(hp, engine.lora.max_rank),
                        0, "fmt", examples)
    engine.trainer.submit(job)
    while engine.trainer.active:
        engine.trainer.run_slice(0.0)
    return job


def test_a_job_teaches_the_format_and_its_adapter_is_served_at_once(tiny_model_dir, tmp_path):
    from server_harness import tiny_engine

    engine = tiny_engine(tiny_model_dir("llama"), quantization="none", enable_fine_tuning=True,
                         fine_tuning_dir=str(tmp_path))
    want = engine.tokenizer.hf.encode(ANSWER, add_special_tokens=False)
    held_out = [engine.tokenizer.encode(f"question {i} about item {i % 5}") for i in range(40, 44)]

    def answers(lora):
        for i, p in enumerate(held_out):
            engine.add_request(p, GREEDY, request_id=f"{lora}-{i}", lora=lora)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return [done[f"{lora}-{i}"] for i in range(len(held_out))]

    before = answers(None)
    assert all(a[:len(want)] != want for a in before)
    job = run_job(engine, format_lines(24), n_epochs=4, batch_size=4, learning_rate_multiplier=20, lora_rank=8)
    assert job.status == "succeeded", job.error
    losses = [e.data["train_loss"] for e in job.events if e.type == "metrics"]
    assert len(losses) == 24 and losses[-1] < 0.2 * losses[0]
    assert job.fine_tuned_model in engine.lora.adapters and job.trained_tokens > 0
    assert all(a[:len(want)] == want for a in answers(job.fine_tuned_model))
    assert answers(None) == before                     # the base model is untouched
    assert engine.trainer._base is None                # the float copy is released with the last job


def test_server_fine_tunes_with_the_openai_client_while_serving(tiny_model_dir, tmp_path):
    import openai
    from server_harness import ServerThread, tiny_engine

    engine = tiny_engine(tiny_model_dir("llama"), quantization="none", enable_fine_tuning=True,
                         fine_tuning_dir=str(tmp_path), fine_tuning_step_ms=20)
    prompts = [f"some request {i} to serve" for i in range(6)]
    with ServerThread(engine) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        def complete(model="tiny"):
            return [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
                    for p in prompts]
        reference = complete()
        upload = client.files.create(file=("train.jsonl", "\n".join(format_lines(24)).encode()), purpose="fine-tune")
        assert upload.bytes > 0 and client.files.retrieve(upload.id).filename == "train.jsonl"
        job = client.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix="fmt",
                                             hyperparameters={"n_epochs": 4, "batch_size": 4,
                                                              "learning_rate_multiplier": 20})
        assert job.status == "queued" and job.hyperparameters.n_epochs == 4
        served_during = []
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status in ("queued", "running"):
            served_during.append(complete())     # inference goes on while the job trains
        assert job.status == "succeeded", job.error
        assert served_during and all(texts == reference for texts in served_during)
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
        assert len(losses) == 24 and losses[-1] < 0.2 * losses[0]
        models = {m.id: m for m in client.models.list().data}
        assert job.fine_tuned_model.startswith("ft:tiny:fmt:") and models[job.fine_tuned_model].parent == "tiny"
        tuned = client.completions.create(model=job.fine_tuned_model, prompt="question 99 about item 3",
                                          max_tokens=12, temperature=0).choices[0].text
        assert tuned.startswith(ANSWER)
        assert client.fine_tuning.jobs.list().data[0].id == job.id

        # Errors: a file kvloom cannot train on, unknown ids, fine-tuning another model.
        bad = client.files.create(file=("bad.jsonl", b'{"prompt": "x"}\n'), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="line 1"):
            client.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-nope")
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
        with pytest.raises(openai.BadRequestError, match="base model"):
            client.fine_tuning.jobs.create(model="other", training_file=upload.id)

        # A cancelled job stops, frees its trainer and the float copy, and serves nothing.
        slow = client.fine_tuning.jobs.create(model="tiny", training_file=upload.id,
                                              hyperparameters={"n_epochs": 50})
        while client.fine_tuning.jobs.retrieve(slow.id).status == "queued":
            time.sleep(0.05)
        cancelled = client.fine_tuning.jobs.cancel(slow.id)
        assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
        assert not engine.trainer.active and engine.trainer._base is None
        assert complete() == reference
        client.files.delete(bad.id)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(bad.id)


def test_fine_tuning_routes_answer_400_when_not_enabled(tiny_model_dir):
    import openai
    from server_harness import ServerThread, tiny_engine

    with ServerThread(tiny_engine(tiny_model_dir("llama"), quantization="none")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--enable-fine-tuning"):
            client.files.create(file=("t.jsonl", b"{}"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="--enable-fine-tuning"):
            client.fine_tuning.jobs.list()
