"""A trie of token n-grams with counts: what followed a run of tokens, and how often.

Every window of up to `max_len` consecutive tokens is a path from the root;
a node's count is how many windows start with its path. To draft after a
context, walk the context's last few tokens from the root and read the
children below: the likeliest continuations, by count.

Token streams are added incrementally (a request's output as it grows) with
one active node per window still open, so a token costs O(max_len).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


class _Node:
    __slots__ = ("children", "count")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.count = 0


@dataclass
class DraftTree:
    """Draft tokens in depth-first order, the likelier child first, so the likeliest branch is
    tokens[0..depth-1]. parents[i] is the index of token i's parent, -1 for the context's last token."""

    tokens: list[int]
    parents: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, k: int) -> "DraftTree":
        """The first k tokens: still a tree, since parents come before their children."""
        return DraftTree(self.tokens[:k], self.parents[:k])


class NGramTrie:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.root = _Node()
        self.num_nodes = 0

    def extend(self, tokens: list[int], start: int = 0, active: list[_Node | None] | None = None,
               delta: int = 1) -> list[_Node | None]:
        """Count the windows ending at tokens[start:], given `active`, what the previous call returned for
        tokens[:start] (None: from scratch). delta=-1 takes back a stream added before.

        active[j] is the node of the open window of length j + 1 that ends at the latest token.
        """
        if active is None:
            active, start = [], 0
        for t in tokens[start:]:
            grown: list[_Node | None] = []
            for node in [self.root, *active][:self.max_len]:
                child = None if node is None else node.children.get(t)
                if node is not None and child is None and delta > 0:
                    child = node.children[t] = _Node()
                    self.num_nodes += 1
                if child is not None:
                    child.count += delta
                    if child.count <= 0:
                        # No window starts with this path any more. Its subtree holds only the rest of the
                        # windows being removed now: they reach it through `active` and leave one by one.
                        del node.children[t]
                        self.num_nodes -= 1
                grown.append(child)
            active = grown[:self.max_len - 1]
        return active

    def draft(self, context: list[int], max_tokens: int, max_match: int, max_branches: int) -> DraftTree | None:
        """The likeliest continuations of the longest suffix of `context` (up to max_match tokens) seen before.

        Nodes are taken best-first by estimated probability (product of count shares along the path),
        at most max_branches children per node and max_tokens in all.
        """
        for m in range(min(max_match, len(context), self.max_len - 1), 0, -1):
            node = self.root
            for t in context[-m:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.children:
                return _best_first(node, max_tokens, self.max_len - m, max_branches)
        return None


class NativeNGramTrie:
    """NGramTrie's counts and drafts from the native kernels (kvloom/kernels/ngram_trie.cpp): a token's windows
    count ~28x faster than in Python (benchmarks/ngram_trie_speed.py). `active` is a list of node ids here, not of nodes."""

    def __init__(self, max_len: int, native):
        self.max_len = max_len
        self._trie = native.NGramTrie(max_len)

    @property
    def num_nodes(self) -> int:
        return self._trie.num_nodes()

    def extend(self, tokens: list[int], start: int = 0, active: list[int] | None = None,
               delta: int = 1) -> list[int]:
        return self._trie.extend(tokens if active is None else tokens[start:], active, delta)

    def draft(self, context: list[int], max_tokens: int, max_match: int, max_branches: int) -> DraftTree | None:
        found = self._trie.draft(context[-max_match:] if max_match > 0 else [], max_tokens, max_match, max_branches)
        return None if found is None else DraftTree(*found)


def new_trie(max_len: int, native) -> NGramTrie | NativeNGramTrie:
    """The native trie when the kernels module is given (the engine's native kernels are on), else Python's."""
    return NGramTrie(max_len) if native is None else NativeNGramTrie(max_len, native)


def _best_first(node: _Node, max_tokens: int, max_depth: int, max_branches: int) -> DraftTree:
    picked: list[tuple[int, int, float, _Node]] = []     # (token, parent pick index, probability, node)
    heap: list[tuple[float, int, int, int, _Node]] = []
    order = 0

    def push_children(parent_node: _Node, parent_idx: int, prob: float, depth: int) -> None:
        nonlocal order
        if depth >= max_depth:
            return
        total = sum(c.count for c in parent_node.children.values())
        best = sorted(parent_node.children.items(), key=lambda kv: -kv[1].count)[:max_branches]
        for tok, child in best:
            p = prob * child.count / total
            heapq.heappush(heap, (-p, order, tok, parent_idx, child))
            order += 1

    depth_of: list[int] = []
    push_children(node, -1, 1.0, 0)
    while heap and len(picked) < max_tokens:
        neg_p, _, tok, parent_idx, child = heapq.heappop(heap)
        picked.append((tok, parent_idx, -neg_p, child))
        depth_of.append(1 if parent_idx < 0 else depth_of[parent_idx] + 1)
        push_children(child, len(picked) - 1, -neg_p, depth_of[-1])
    return _depth_first(picked)


def _depth_first(picked: list[tuple[int, int, float, _Node]]) -> DraftTree:
    """Reorder picks depth-first, likelier children first (their pick order already says which is likelier)."""
    kids: dict[int, list[int]] = {}
    for i, (_, parent, _, _) in enumerate(picked):
        kids.setdefault(parent, []).append(i)
    tokens: list[int] = []
    parents: list[int] = []
    stack = [(i, -1) for i in reversed(kids.get(-1, []))]
    while stack:
        i, new_parent = stack.pop()
        tokens.append(picked[i][0])
        parents.append(new_parent)
        me = len(tokens) - 1
        stack.extend((c, me) for c in reversed(kids.get(i, [])))
    return DraftTree(tokens, parents)
