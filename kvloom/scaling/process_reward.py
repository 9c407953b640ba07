"""A process reward from the served model, for guided search: the model itself is asked whether a partial
answer is on the right track, and the score is log P(yes) read from the logprobs of that one-token request.

Each grading is an ordinary engine request (greedy, max_tokens 1, the top 20 logprobs), so it batches with
every other request, and the grading prompt's head is shared through the prefix cache. The positive reply's
probability is that of the first token of `positive` (with or without a leading space), summed over the two
when both are among the top 20; when neither is, the score is the 20th logprob (the positive reply is at
most that likely).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.search import Placement
from kvloom.tokenizer import Tokenizer

DEFAULT_TEMPLATE = ("Here is a question and the beginning of an answer to it.\n\nQuestion:\n{question}\n\n"
                    "Answer so far:\n{answer}\n\nIs the answer so far correct and on the right track? "
                    "Reply with Yes or No.")
NAME = "process_reward"
_TOP = 20                          # the sampler's most logprobs
_GRADING = SamplingParams(max_tokens=1, temperature=0.0, logprobs=_TOP)
_SLOT = re.compile(r"\{(question|answer)\}")


@dataclass
class ProcessReward:
    """An EngineScorer (scaling/guided.py) grading partial answers to `question` with the engine's model."""
    question: str
    template: str = DEFAULT_TEMPLATE     # {question} and {answer} are filled in; rendered as a user turn
    positive: str = "Yes"
    _positive_ids: frozenset = field(default=frozenset(), repr=False)

    @classmethod
    def from_field(cls, value, question: str, field_name: str = "guided_search.scorer") -> ProcessReward:
        """The server's setting: absent, "process_reward", or {"name": "process_reward", "template", "positive"}."""
        if value is None or value == NAME:
            return cls(question)
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{field_name} must be {NAME!r} or an object, got {value!r}", field=field_name)
        unknown = set(value) - {"name", "template", "positive"}
        if unknown:
            raise InvalidRequestError(f"{field_name} has unknown fields {sorted(unknown)} (known: name, template, "
                                      "positive)", field=field_name)
        if value.get("name", NAME) != NAME:
            raise InvalidRequestError(f"{field_name}.name must be {NAME!r} (the served model grades), got "
                                      f"{value.get('name')!r}", field=f"{field_name}.name")
        template = value.get("template", DEFAULT_TEMPLATE)
        if not isinstance(template, str) or "{answer}" not in template:
            raise InvalidRequestError(f"{field_name}.template must be a string containing {{answer}} (and "
                                      "optionally {question})", field=f"{field_name}.template")
        positive = value.get("positive", "Yes")
        if not isinstance(positive, str) or not positive.strip():
            raise InvalidRequestError(f"{field_name}.positive must be a non-empty string",
                                      field=f"{field_name}.positive")
        return cls(question, template, positive)

    def prompt_ids(self, tokenizer: Tokenizer, answer: str) -> list[int]:
        values = {"question": self.question, "answer": answer}
        content = _SLOT.sub(lambda m: values[m.group(1)], self.template)   # one pass: no slot inside a value
        if tokenizer.hf.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": content}])
        return tokenizer.encode(content + "\n")

    def check_fits(self, tokenizer: Tokenizer, max_model_len: int, prompt_len: int, max_tokens: int | None) -> None:
        """The grading prompt with the longest answer the request may draw must fit the model's context."""
        grading = len(self.prompt_ids(tokenizer, ""))
        longest = max_model_len - prompt_len if max_tokens is None else min(max_tokens, max_model_len - prompt_len)
        if grading + longest >= max_model_len:
            room = max_model_len - 1 - grading
            raise InvalidRequestError(
                f"guided search grades partial answers with a {grading}-token prompt around them: with a context "
                f"of {max_model_len} tokens, " + (f"max_tokens must be at most {room}" if room > 0 else
                                                   "no answer fits; shorten the question or the template"),
                field="max_tokens")

    def submit(self, engine: Engine, text: str, request_id: str, placement: Placement) -> None:
        if not self._positive_ids:
            words = (self.positive.strip(), " " + self.positive.strip())
            encoded = [engine.tokenizer.hf.encode(w, add_special_tokens=False) for w in words]
            self._positive_ids = frozenset(ids[0] for ids in encoded if ids)
        placement.add(engine, self.prompt_ids(engine.tokenizer, text), _GRADING, request_id)

    def read(self, output: RequestOutput) -> float:
        top = output.logprobs[0].top
        p = sum(math.exp(lp) for t, lp in top if t in self._positive_ids)
        return math.log(p) if p > 0 else top[-1][1]
