"""A fine-tuning file (JSONL, as OpenAI's fine-tuning API takes it) turned into token ids and training targets.

Each line is either a conversation, {"messages": [{"role": ..., "content": ...}, ...]}, rendered with the
model's chat template and trained on its assistant turns only (their end-of-turn token included, so the model
learns to stop), or a {"prompt": ..., "completion": ...} pair, trained on the completion and an end-of-sequence
token. Any line kvloom cannot train on is an error naming the line, before a job starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from kvloom.errors import InvalidRequestError

_ROLES = ("system", "user", "assistant", "developer")


@dataclass
class TrainingExample:
    input_ids: list[int]      # the tokens fed in
    targets: list[int]        # the next token at each position, or -100 where nothing is learned

    @property
    def num_trained(self) -> int:
        return sum(t != -100 for t in self.targets)


def _bad(line: int, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"training file line {line}: {why}", field="training_file")


def _assistant_spans(tokenizer, messages: list[dict], line: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's tokens and the [start, end) of each assistant turn in them."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True) if k else []
        through = tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
        if ids[:len(through)] != through or through[:len(before)] != before:
            raise _bad(line, "this model's chat template does not render the conversation turn by turn, so the "
                             "assistant's tokens cannot be found; use prompt/completion lines")
        spans.append((len(before), len(through)))
    return ids, spans


def _example(tokenizer, record, line: int) -> tuple[list[int], list[bool]]:
    if not isinstance(record, dict):
        raise _bad(line, "each line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
                           for m in messages)):
            raise _bad(line, f"messages must be a non-empty list of {{role, content}} with role in {_ROLES} and "
                             "string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise _bad(line, "a conversation needs at least one assistant message to learn from")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids, spans = _assistant_spans(tokenizer, messages, line)
        trained = [False] * len(ids)
        for a, b in spans:
            trained[a:b] = [True] * (b - a)
        return ids, trained
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        prompt = tokenizer.encode(record["prompt"])
        completion = tokenizer.hf.encode(record["completion"], add_special_tokens=False)
        eos = tokenizer.hf.eos_token_id
        if eos is None:
            eos = min(tokenizer.eos_token_ids)
        completion = completion + [eos]
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    raise _bad(line, 'expected {"messages": [...]} or {"prompt": "...", "completion": "..."}')


def parse_training_file(content: bytes, tokenizer, max_tokens: int) -> list[TrainingExample]:
    """Every example of the file, or an InvalidRequestError naming the first line that cannot be trained on."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the training file is not UTF-8 ({e})", field="training_file") from e
    examples = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise _bad(line, f"not JSON ({e})") from e
        ids, trained = _example(tokenizer, record, line)
        if len(ids) > max_tokens:
            raise _bad(line, f"{len(ids)} tokens, above the {max_tokens} a training example may have")
        # Position t learns token t+1 where t+1 is trained.
        targets = [ids[t + 1] if trained[t + 1] else -100 for t in range(len(ids) - 1)]
        if all(t == -100 for t in targets):
            raise _bad(line, "nothing to learn: the trained part is empty")
        examples.append(TrainingExample(ids[:-1], targets))
    if not examples:
        raise InvalidRequestError("the training file has no examples", field="training_file")
    return examples
