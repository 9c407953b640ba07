"""A model directory is untrusted input: loading one never unpickles, never runs its Python, never reads files
outside it, and its chat template renders only inside jinja2's sandbox.

Each attack leaves a marker file if it gets to run; every test checks that the marker is absent, and where
the payload could silently do nothing, a control shows that it does run outside kvloom's guard.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import httpx
import jinja2
import pytest
import torch

import kvloom
from kvloom import LLM
from kvloom.errors import InvalidRequestError, ModelNotFoundError, UnsupportedArchitectureError, WeightsError
from kvloom.models.loader import load_model
from kvloom.models.model_source import ModelSource, resolve_model
from kvloom.tokenizer import Tokenizer
from server_harness import ServerThread, tiny_engine


def _copy(tiny_model_dir, tmp_path, name="m") -> Path:
    d = tmp_path / name
    shutil.copytree(tiny_model_dir("llama"), d)
    return d


# ---- no pickles -------------------------------------------------------------------------------------------

class _TouchOnUnpickle:
    """Unpickling this calls open(path, "w"): what a booby-trapped checkpoint does, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _checkpoint(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": _TouchOnUnpickle(marker)})


def test_the_pickle_payload_is_live(tmp_path):
    # Control: the bytes the tests below plant do run code when unpickled.
    proof = tmp_path / "proof"
    pickle.loads(_checkpoint(proof))["model.embed_tokens.weight"].close()  # the file open() returned
    assert proof.exists()


@pytest.mark.parametrize("layout", ["hf-dir-with-bin", "bare-dir-with-pt", "ckpt-file", "pth-file"])
def test_pickle_checkpoints_are_refused_unopened(tiny_model_dir, tmp_path, layout):
    marker = tmp_path / "MARKER"
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    if layout == "hf-dir-with-bin":
        target, planted = d, d / "pytorch_model.bin"
    elif layout == "bare-dir-with-pt":
        (d / "config.json").unlink()
        target, planted = d, d / "model.pt"
    else:
        planted = tmp_path / f"model.{layout.split('-')[0]}"
        target = planted
    planted.write_bytes(_checkpoint(marker))
    with pytest.raises(ModelNotFoundError, match="never unpickles") as info:
        LLM(str(target))
    assert planted.name in str(info.value) and "safetensors and GGUF" in str(info.value)
    assert not marker.exists()


def test_pickle_refusal_also_guards_the_weight_loader(tiny_model_dir, tmp_path):
    # A ModelSource built without resolve_model (its check) still reaches no unpickler.
    marker = tmp_path / "MARKER"
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(_checkpoint(marker))
    with pytest.raises(ModelNotFoundError, match="never unpickles"):
        load_model(ModelSource(str(d), None, "m"), torch.float32)
    assert not marker.exists()


def test_no_unpickling_call_anywhere_in_kvloom():
    # The loaders read safetensors and GGUF only; this keeps a torch.load / pickle.load from creeping in.
    risky = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                       r"\b(joblib|dill|cloudpickle)\.loads?\(")
    package = Path(kvloom.__file__).parent
    hits = [f"{p.relative_to(package)}:{i}: {line.strip()}" for p in sorted(package.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if risky.search(line)]
    assert hits == []


# ---- no model code, no files outside the directory ----------------------------------------------------------

def test_model_directory_code_is_never_run(tiny_model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="kvloom_test_custom", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "custom.CustomConfig"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                 "from transformers import LlamaConfig\n"
                                 "class CustomConfig(LlamaConfig):\n    model_type = 'kvloom_test_custom'\n")
    # transformers asks on stdin whether to run a directory's code unless told not to: answer yes, as a
    # user or a piped `yes |` might. kvloom passes trust_remote_code=False, so nothing is asked.
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    # Were the code run after all, transformers would copy it here rather than under ~/.cache.
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(UnsupportedArchitectureError, match="custom code"):
        load_model(resolve_model(str(d)), torch.float32)
    assert asked == [] and not marker.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}"])
def test_shard_index_cannot_point_outside_the_model_directory(tiny_model_dir, tmp_path, shard):
    d = _copy(tiny_model_dir, tmp_path)
    outside = tmp_path / "outside.safetensors"
    (d / "model.safetensors").rename(outside)  # a valid file: only the path is wrong
    shard = shard.format(abs=outside)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(WeightsError, match="outside the model directory"):
        load_model(resolve_model(str(d)), torch.float32)


# ---- chat templates render sandboxed -------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').close() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').close() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ namespace.__init__.__globals__['os'].popen('touch MARKER').close() }}",
]
MESSAGES = [{"role": "user", "content": "hi"}]


def _with_template(tiny_model_dir, tmp_path, template: str) -> Path:
    d = _copy(tiny_model_dir, tmp_path)
    (d / "chat_template.jinja").unlink()  # it would win over tokenizer_config.json's template
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("template", [t for t in ESCAPES if "MARKER" in t])
def test_the_template_payloads_are_live_outside_the_sandbox(tmp_path, template):
    # Control: rendered by a plain jinja2 Environment, these templates run a shell command.
    proof = tmp_path / "proof"
    jinja2.Environment().from_string(template.replace("MARKER", str(proof))).render(messages=MESSAGES)
    assert proof.exists()


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_template_escapes_are_refused(tiny_model_dir, tmp_path, template):
    marker = tmp_path / "MARKER"
    d = _with_template(tiny_model_dir, tmp_path, template.replace("MARKER", str(marker)))
    tok = Tokenizer.load(resolve_model(str(d)))
    assert tok.hf.chat_template.startswith(template[:10])  # the planted template is the one in use
    with pytest.raises(InvalidRequestError, match="sandbox forbids") as info:
        tok.apply_chat_template(MESSAGES)
    assert info.value.field == "messages"
    assert not marker.exists()


def test_server_answers_a_template_escape_with_400_and_keeps_serving(tiny_model_dir, tmp_path):
    marker = tmp_path / "MARKER"
    d = _with_template(tiny_model_dir, tmp_path, ESCAPES[1].replace("MARKER", str(marker)))
    with ServerThread(tiny_engine(str(d), max_model_len=64)) as s:
        chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400, r.text
        assert "sandbox" in r.json()["error"]["message"]
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**chat, "tools": [tool]}, timeout=60)
        assert r.status_code == 400, r.text   # the tools path renders through the same sandbox
        r = httpx.post(f"{s.url}/tokenize", json={"model": "tiny", "messages": MESSAGES}, timeout=60)
        assert r.status_code == 400, r.text
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    assert not marker.exists()
