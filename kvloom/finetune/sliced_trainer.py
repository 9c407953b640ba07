"""LoRA training cut into small pieces of work, so it can fill what inference leaves of each engine step.

FlexLLM co-serves fine-tuning with inference token by token. Here the pieces are one decoder layer's forward
or backward over one example, or one chunk of the LM head's loss: the graph is cut at every layer boundary
(each layer's input is a detached leaf), so the backward runs layer by layer too, and a piece of work takes a
few milliseconds for a short example. The pieces always run in the same order whatever the time slices are,
so a job trains the same weights whether it runs alone or between inference steps (tested).

Examples are processed one at a time; gradients accumulate over `batch_size` examples (the loss is summed over
the batch's trained tokens and divided by their count, as one batched pass would), then AdamW steps.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kvloom.finetune.dataset import TrainingExample
from kvloom.finetune.lora_forward import TrainableLora, head_loss, layer_forward

HEAD_CHUNK = 64     # rows of the LM head's logits at once (49k-wide rows: 12 MB a chunk)


@dataclass
class StepReport:
    step: int               # optimizer steps done
    total_steps: int
    loss: float             # mean loss per trained token over this step's batch
    epoch: int


class SlicedTrainer:
    def __init__(self, model, lora: TrainableLora, examples: list[TrainingExample], epochs: int, batch_size: int,
                 learning_rate: float, seed: int, on_step: Callable[[StepReport], None] | None = None):
        self.model, self.lora, self.on_step = model, lora, on_step
        order = []
        rng = random.Random(seed)
        for epoch in range(epochs):
            idx = list(range(len(examples)))
            rng.shuffle(idx)
            order += [(epoch, i) for i in idx]
        self.batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        self.examples = examples
        self.optimizer = torch.optim.AdamW(lora.parameters(), lr=learning_rate, weight_decay=0.0)
        self.trained_tokens = 0
        self.done = False
        self._seconds_per_token: dict[str, float] = {}   # measured cost of each kind of piece, per token
        self._work = self._pieces()
        self._next = next(self._work)                    # the piece to run next: (kind, tokens)

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def run(self, budget_s: float, at_least_one: bool = False) -> float:
        """Run pieces of work for about budget_s seconds: a piece starts only if its measured cost fits what is
        left (a piece of unknown cost runs once to be measured); at_least_one: the first piece runs whatever
        its cost (the server is idle: a piece longer than a slice must still get done). Returns seconds spent."""
        start = time.perf_counter()
        ran = 0
        while not self.done:
            kind, tokens = self._next
            spent = time.perf_counter() - start
            estimate = self._seconds_per_token.get(kind, 0.0) * tokens
            if spent + estimate > budget_s and not (at_least_one and ran == 0):
                break
            ran += 1
            t0 = time.perf_counter()
            self._next = next(self._work, None)
            cost = (time.perf_counter() - t0) / max(tokens, 1)
            old = self._seconds_per_token.get(kind)
            self._seconds_per_token[kind] = cost if old is None else 0.8 * old + 0.2 * cost
            if self._next is None:
                self.done = True
        return time.perf_counter() - start

    def run_to_end(self) -> None:
        while not self.done:
            self.run(math.inf)

    # ---- the pieces, in order ---------------------------------------------------------------

    def _pieces(self) -> Iterator[tuple[str, int]]:
        """Yields (kind, tokens) of the piece about to run; resuming runs it."""
        model = self.model
        lowest = self.lora.lowest_layer()
        for step, batch in enumerate(self.batches, 1):
            batch_tokens = sum(self.examples[i].num_trained for _, i in batch)
            loss_sum = 0.0
            for epoch, index in batch:
                ex = self.examples[index]
                n = len(ex.input_ids)
                yield "layer_forward", n
                ids = torch.tensor(ex.input_ids)
                h = model.embed_tokens(ids)
                cos, sin = model.rope.cos_sin(torch.arange(n), h.dtype)
                inputs, outputs = [], []
                for i in range(model.shape.num_layers):
                    if i > 0:
                        yield "layer_forward", n
                    leaf = h.detach().requires_grad_(i > lowest)
                    with torch.set_grad_enabled(i >= lowest):
                        out = layer_forward(model, i, self.lora, leaf, cos, sin)
                    inputs.append(leaf)
                    outputs.append(out)
                    h = out.detach()
                top = h.requires_grad_()
                targets = torch.tensor(ex.targets)
                for a in range(0, n, HEAD_CHUNK):
                    rows = targets[a:a + HEAD_CHUNK]
                    if bool((rows != -100).any()):
                        yield "head", len(rows)
                        loss = head_loss(model, top[a:a + HEAD_CHUNK], rows, batch_tokens)
                        loss.backward()
                        loss_sum += loss.item() * batch_tokens
                grad = top.grad
                for i in range(model.shape.num_layers - 1, lowest - 1, -1):
                    yield "layer_backward", n
                    outputs[i].backward(grad)
                    grad = inputs[i].grad
                    outputs[i] = inputs[i] = None      # this layer's graph is no longer needed
                self.trained_tokens += n
            yield "optimizer", 1
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_step is not None:
                self.on_step(StepReport(step, self.total_steps, loss_sum / batch_tokens, batch[-1][0] + 1))
