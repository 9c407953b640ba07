"""A GGUF file's config and tokenizer, converted once by transformers and kept as plain HF files.

transformers builds both by parsing the whole GGUF metadata (the vocabulary
and merges too), which takes seconds each time. The converted files are
saved under a cache folder keyed by the file's path, size and mtime and the
transformers version, and loaded from there afterwards.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil

import transformers
from transformers import AutoConfig, AutoTokenizer

from kvloom.models.model_source import ModelSource
from kvloom.models.weight_file_checks import check_gguf

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kvloom", "gguf")


def _cache_path(source: ModelSource, cache_dir: str) -> str:
    st = os.stat(source.gguf_path)
    ident = f"{os.path.abspath(source.gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return os.path.join(cache_dir, hashlib.sha256(ident.encode()).hexdigest()[:24])


def converted_dir(source: ModelSource, cache_dir: str = DEFAULT_CACHE_DIR) -> str | None:
    """A folder with config.json and tokenizer files for a GGUF source, or None if it cannot be written."""
    path = _cache_path(source, cache_dir)
    if os.path.isfile(os.path.join(path, "complete")):
        return path
    check_gguf(source.gguf_path)  # before transformers' reader trusts the header's counts
    try:
        config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                  trust_remote_code=False)
        tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, "complete"), "w").close()
        try:
            os.replace(tmp, path)
        except OSError:  # another process got there first: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    except OSError as e:  # read-only home and the like: convert in memory every time instead
        log.warning("cannot cache the converted GGUF metadata (%s); loading it directly", e)
        return None
