"""LoRA training cut into small pieces of work, so it can fill what inference leaves of each engine step.

FlexLLM co-serves fine-tuning with inference token by token. Here a piece of work is one decoder layer's
forward or backward over one chunk of TRAIN_CHUNK tokens of an example, one chunk of the LM head's loss, or
one optimizer step. The graph is cut at every layer boundary and between chunks (a layer's input, and the keys
and values later chunks read, are detached leaves whose gradients are handed back explicitly), so the backward
runs piece by piece too, and a piece costs a few milliseconds however long the example. The pieces always run
in the same order whatever the time slices are, so a job trains the same weights whether it runs alone or
between inference steps (tested).

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

TRAIN_CHUNK = 64    # tokens of one piece of work (a 49k-wide vocabulary makes a head chunk's logits 12 MB)


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
        self.pieces_done = 0
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
            self.pieces_done += 1
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
        num_layers, lowest = model.shape.num_layers, self.lora.lowest_layer()
        for step, batch in enumerate(self.batches, 1):
            batch_tokens = sum(self.examples[i].num_trained for _, i in batch)
            loss_sum = 0.0
            for epoch, index in batch:
                ex = self.examples[index]
                n = len(ex.input_ids)
                spans = [(a, min(a + TRAIN_CHUNK, n)) for a in range(0, n, TRAIN_CHUNK)]
                ids = torch.tensor(ex.input_ids)
                cos, sin = model.rope.cos_sin(torch.arange(n), torch.float32)
                h = [model.embed_tokens(ids[a:b]) for a, b in spans]     # the next layer's input, by chunk
                graphs: list[list | None] = []
                for i in range(num_layers):
                    trains = i >= lowest                   # below the lowest adapted layer nothing needs a graph
                    chunks, past_k, past_v = [], [], []
                    for c, (a, b) in enumerate(spans):
                        yield "forward", b - a
                        leaf = h[c].detach().requires_grad_(i > lowest)
                        with torch.set_grad_enabled(trains):
                            out, k, v = layer_forward(model, i, self.lora, leaf, cos[a:b], sin[a:b],
                                                      torch.cat(past_k) if past_k else None,
                                                      torch.cat(past_v) if past_v else None)
                        # Later chunks read this chunk's keys and values as leaves: their gradients gather there
                        # and enter this chunk's graph when its backward runs.
                        past_k.append(k.detach().requires_grad_(k.requires_grad))
                        past_v.append(v.detach().requires_grad_(v.requires_grad))
                        chunks.append((leaf, out, k, v, past_k[-1], past_v[-1]))
                        h[c] = out.detach()
                    graphs.append(chunks if trains else None)
                top = [x.requires_grad_() for x in h]
                targets = torch.tensor(ex.targets)
                for c, (a, b) in enumerate(spans):
                    if bool((targets[a:b] != -100).any()):
                        yield "head", b - a
                        loss = head_loss(model, top[c], targets[a:b], batch_tokens)
                        loss.backward()
                        loss_sum += loss.item() * batch_tokens
                grads = [x.grad for x in top]
                for i in range(num_layers - 1, lowest - 1, -1):
                    for c in range(len(spans) - 1, -1, -1):   # last chunk first: it sends gradients to earlier K, V
                        leaf, out, k, v, k_leaf, v_leaf = graphs[i][c]
                        pairs = [(t, g) for t, g in ((out, grads[c]), (k, k_leaf.grad), (v, v_leaf.grad))
                                 if g is not None]
                        if pairs:
                            yield "backward", spans[c][1] - spans[c][0]
                            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                        grads[c] = leaf.grad
                        graphs[i][c] = None              # this piece's graph is no longer needed
                self.trained_tokens += n
            yield "optimizer", 1
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_step is not None:
                self.on_step(StepReport(step, self.total_steps, loss_sum / batch_tokens, batch[-1][0] + 1))
