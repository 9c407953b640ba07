"""Accepting draft tokens without changing what the model would have produced.

The verification pass gives the target model's logits after the context's
last token (the root) and after every draft token. Walking the draft tree from
the root:

- greedy: a child is accepted when it is the argmax at its parent, which is
  exactly the token plain decoding would have produced there;
- sampling: the children of a node are tried in turn, each accepted with
  probability p(d) under what is left of the target distribution p; a
  rejected d is removed from p and p renormalised. When no child is accepted
  the next token is drawn from the remainder. Every token therefore comes out
  with probability p(token): trie drafts are deterministic proposals (a point
  mass), for which this is the standard speculative-sampling rule applied
  recursively over siblings.

The walk ends with one token the model chose itself (the "bonus"), so a step
always yields at least one token.
"""
from __future__ import annotations

import torch

from kvloom.engine.request import Request
from kvloom.engine.sampler import target_probs
from kvloom.speculation.ngram_trie import DraftTree


def verify(logits: torch.Tensor, tree: DraftTree, req: Request) -> tuple[list[int], list[int]]:
    """logits: [1 + len(tree), vocab], the root's row first, then one per draft token in tree order.

    Returns the tokens to append and the draft indices of the accepted path.
    """
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(i)
    greedy = req.params.greedy
    rows = logits.float()
    tokens: list[int] = []
    path: list[int] = []
    node = -1
    while True:
        row = rows[node + 1]
        if greedy:
            choice = int(row.argmax())
            nxt = next((c for c in children.get(node, ()) if tree.tokens[c] == choice), None)
            tokens.append(choice)
        else:
            probs = target_probs(row, req.params)
            probs = probs / probs.sum()
            nxt = None
            for c in children.get(node, ()):
                d = tree.tokens[c]
                if float(torch.rand((), generator=req.generator)) < float(probs[d]):
                    nxt = c
                    break
                rest = probs.clone()
                rest[d] = 0.0
                total = rest.sum()
                if total <= 0:   # d was the only possible token (float rounding of p(d) = 1)
                    nxt = c
                    break
                probs = rest / total
            if nxt is None:
                tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
            else:
                tokens.append(tree.tokens[nxt])
        if nxt is None:
            return tokens, path
        path.append(nxt)
        node = nxt
