"""Malformed weight files: every truncated, oversized or lying header ends in a KvloomError naming the file.

Hypothesis mutates the headers of a small valid safetensors model and a small
valid GGUF (config and tokenizer metadata included, so a mutation that slips
through still goes all the way through transformers' conversion and the weight
load). An example passes if the model loads (the mutation was harmless) or a
KvloomError names the file; a raw struct/Key/Index/RuntimeError, a MemoryError
anywhere in the error's chain, or a hang (pytest-timeout) fails it.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kvloom.errors import KvloomError, UnsupportedArchitectureError, WeightsError
from kvloom.models import loader
from kvloom.models.gguf_metadata_cache import converted_dir
from kvloom.models.gguf_weights import open_gguf
from kvloom.models.model_source import resolve_model
from kvloom.tokenizer import Tokenizer
from test_gguf import TYPES, _gguf_name, _kind, _permute

HEADS, KV_HEADS = 4, 2
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
HUGE = [2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]


@pytest.fixture(scope="module", autouse=True)
def gguf_cache_in_tmp(tmp_path_factory):
    # converted_dir keeps a GGUF's converted metadata under ~/.cache; fuzzed files keep theirs in tmp.
    cached = functools.partial(converted_dir, cache_dir=str(tmp_path_factory.mktemp("gguf-cache")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kvloom.models.loader.converted_dir", cached)
        mp.setattr("kvloom.tokenizer.converted_dir", cached)
        yield


def load(path: str) -> None:
    """What an engine start does with a model path, up to the KV pool."""
    source = resolve_model(path)
    _, hf_config = loader.load_model(source, torch.float32, keep_gguf_blocks=True)
    Tokenizer.load(source, hf_config)


def loads_or_refuses(path: str, names: str) -> str:
    try:
        load(path)
    except KvloomError as e:
        assert names in str(e), f"the error does not name {names}: {e}"
        chain, cause = [], e
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        assert not any(isinstance(c, MemoryError) for c in chain), f"tried a huge allocation: {chain}"
        return f"refused: {type(e).__name__}"
    return "loaded"


# ---- safetensors --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_model(tiny_model_dir, tmp_path_factory):
    """(a copy of the tiny model whose model.safetensors the fuzz test overwrites, the file's header as a
    dict, its tensor bytes)."""
    d = tmp_path_factory.mktemp("st-fuzz") / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    data = (d / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", data)[0]
    return str(d), json.loads(data[8:8 + n]), data[8 + n:]


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


@st.composite
def safetensors_files(draw, header: dict, body: bytes) -> bytes:
    header = json.loads(json.dumps(header))
    names = _tensor_names(header)
    entry = header[draw(st.sampled_from(names))]
    claimed_len = None
    kind = draw(st.sampled_from(["length", "bytes", "dtype", "shape", "reshape", "offsets", "overlap", "truncate",
                                 "drop"]))
    if kind == "length":  # the 8-byte header length: too short, too long, past the file, huge
        claimed_len = draw(st.one_of(st.sampled_from([0, 1, 2, 7, 8, 100 * 2**20, *HUGE]),
                                     st.integers(0, 2**64 - 1)))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", "", 3,
                                               None]))
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(
            st.lists(st.one_of(st.integers(0, 512), st.sampled_from([-1, *HUGE])), max_size=6),
            st.sampled_from([None, "64", [64.5], [[64]]])))
    elif kind == "reshape":  # the same byte count as another shape: only kvloom's own shape check can tell
        shape = entry["shape"]
        entry["shape"] = draw(st.sampled_from([shape[::-1], [int(np.prod(shape))], [1, *shape]]))
    elif kind == "offsets":
        end = len(body)
        point = st.one_of(st.integers(0, end + 64), st.sampled_from([-1, *HUGE]))
        entry["data_offsets"] = draw(st.one_of(st.lists(point, min_size=2, max_size=2), st.lists(point, max_size=3)))
    elif kind == "overlap":  # two tensors claim the same bytes
        other = header[draw(st.sampled_from(names))]
        entry["data_offsets"] = list(other["data_offsets"])
    elif kind == "drop":
        del header[draw(st.sampled_from(names))]
    raw = json.dumps(header).encode()
    if kind == "bytes":  # random bytes anywhere in the JSON
        raw = bytearray(raw)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                                       min_size=1, max_size=6)):
            raw[pos] = byte
        raw = bytes(raw)
    if kind == "truncate":
        body = body[:draw(st.integers(0, len(body) - 1))]
    return struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + body


def test_unmutated_safetensors_loads(tiny_model_dir):
    assert loads_or_refuses(tiny_model_dir("llama"), "") == "loaded"


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_safetensors_header_fuzz(st_model, data):
    d, header, body = st_model
    blob = data.draw(safetensors_files(header, body))
    with open(f"{d}/model.safetensors", "wb") as f:
        f.write(blob)
    event(loads_or_refuses(d, d))


@pytest.mark.parametrize("claimed", [2**64 - 1, 2**40, "file+1"])
def test_safetensors_header_longer_than_the_file(tiny_model_dir, st_model, tmp_path, claimed):
    _, header, body = st_model
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    raw = json.dumps(header).encode()
    n = len(raw) + len(body) + 1 if claimed == "file+1" else claimed  # "file+1": one byte past the end
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw + body)
    with pytest.raises(WeightsError, match="model.safetensors"):
        load(str(d))


@pytest.mark.parametrize("index", ['{"weight_map": ', '[1, 2]', '{"weight_map": {"a": ["x"]}}', '{"other": {}}'])
def test_malformed_shard_index(tiny_model_dir, tmp_path, index):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match="model.safetensors.index.json"):
        load(str(d))


# ---- GGUF ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_full_gguf(tiny_model_dir, tmp_path_factory):
    """A tiny Llama as a GGUF with everything transformers needs (config and BPE tokenizer metadata) and
    test_gguf's mix of tensor types (F32, F16, BF16, Q8_0, Q4_0, Q4_1)."""
    d = tiny_model_dir("llama")
    tok = json.loads(Path(d, "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    path = str(tmp_path_factory.mktemp("gguf-fuzz") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in load_file(f"{d}/model.safetensors").items():
        arr = t.float().numpy()
        if name.endswith("q_proj.weight"):
            arr = _permute(arr, HEADS)
        elif name.endswith("k_proj.weight"):
            arr = _permute(arr, KV_HEADS)
        qtype = gguf.GGMLQuantizationType[TYPES[_kind(name)][0]]
        w.add_tensor(_gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_layout(tiny_full_gguf):
    """(file bytes, where the tensor data starts, offsets of the header's u64 fields (counts, string and
    array lengths, dimensions, tensor offsets: where a lie about a size sits), offsets of its u32 fields
    (value types, dimension counts, tensor types, u32 values such as block_count))."""
    reader = gguf.GGUFReader(tiny_full_gguf)
    base = reader.data.ctypes.data  # the parts are views of the file's memmap
    fields: dict[int, set[int]] = {4: set(), 8: set()}
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in fields:
                fields[part.dtype.itemsize].update(part.ctypes.data - base + part.dtype.itemsize * i
                                                   for i in range(min(part.size, 4)))
    data = Path(tiny_full_gguf).read_bytes()
    return data, reader.data_offset, sorted(fields[8]), sorted(fields[4])


_names = itertools.count()


def _write(directory, blob: bytes) -> str:
    path = f"{directory}/m{next(_names)}.gguf"  # a new name each time: the metadata cache is keyed by path
    with open(path, "wb") as f:
        f.write(blob)
    return path


@st.composite
def gguf_files(draw, layout) -> bytes:
    data, header_end, u64_fields, u32_fields = layout
    blob = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "flip", "size", "u32"]))
    if kind == "truncate":
        return bytes(blob[:draw(st.one_of(st.integers(0, header_end + 64), st.integers(0, len(data) - 1)))])
    if kind == "flip":  # random bit flips in the header: magic, counts, metadata, tensor table
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 7)),
                                      min_size=1, max_size=4)):
            blob[pos] ^= 1 << bit
        return bytes(blob)
    width, fields = (8, u64_fields) if kind == "size" else (4, u32_fields)
    for offset in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique=True)):
        value = draw(st.one_of(st.sampled_from([0, 1, 3, len(data), len(data) + 1, *HUGE]),
                               st.integers(0, 2**(8 * width) - 1)))
        struct.pack_into("<Q" if width == 8 else "<I", blob, offset, value % 2**(8 * width))
    return bytes(blob)


def test_unmutated_gguf_loads(tiny_full_gguf):
    assert loads_or_refuses(tiny_full_gguf, tiny_full_gguf) == "loaded"


@pytest.fixture(scope="module")
def mutants_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-mutants")


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_gguf_header_fuzz(gguf_layout, mutants_dir, data):
    path = _write(mutants_dir, data.draw(gguf_files(gguf_layout)))
    try:
        event(loads_or_refuses(path, path))
    finally:
        os.remove(path)


def _with_u(layout, offset: int, value: int, width: int = 8) -> bytes:
    blob = bytearray(layout[0])
    struct.pack_into("<Q" if width == 8 else "<I", blob, offset, value)
    return bytes(blob)


def _value_offset(path: str, key: str) -> int:
    """Where the value of metadata `key` starts (for an array: its element type)."""
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(bytes(field.parts[1])) + 4


@pytest.mark.timeout(60)  # gguf's own reader loops ~forever over such a count
def test_lying_array_count_is_refused_before_any_reader_trusts_it(tiny_full_gguf, gguf_layout, tmp_path):
    count_at = _value_offset(tiny_full_gguf, "tokenizer.ggml.token_type") + 4
    assert struct.unpack_from("<Q", gguf_layout[0], count_at)[0] == 384  # the vocabulary's size: the right field
    path = _write(tmp_path, _with_u(gguf_layout, count_at, 2**40))
    with pytest.raises(WeightsError, match="tokenizer.ggml.token_type.*1099511627776 values"):
        open_gguf(path)
    with pytest.raises(WeightsError, match="m\\d+.gguf"):
        load(path)


@pytest.mark.parametrize("key, value, error, match", [
    ("llama.context_length", 2**31, UnsupportedArchitectureError, "context of 2147483648 positions"),
    ("llama.block_count", 2**20, WeightsError, "claims 1048576 layers, the file has weights for 2"),
    ("llama.embedding_length", 2**16, WeightsError, "the config implies .*65536"),
    ("llama.feed_forward_length", 2**30, WeightsError, "the config implies .*1073741824"),
])
def test_config_sizes_are_checked_against_the_file_before_allocating(tiny_full_gguf, gguf_layout, tmp_path,
                                                                     key, value, error, match):
    # Each of these would have the loader allocate tens of GB (or build a million layers) before any weight
    # is compared; the tensor table in the header says what the file really holds.
    path = _write(tmp_path, _with_u(gguf_layout, _value_offset(tiny_full_gguf, key), value, width=4))
    with pytest.raises(error, match=match) as info:
        load(path)
    assert path in str(info.value)
