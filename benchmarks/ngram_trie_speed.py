"""Lookahead's n-gram tries, Python against C++ (kvloom/kernels/ngram_trie.cpp):
`python benchmarks/ngram_trie_speed.py [OUT.json]`.

Times, for the speculator's trie (max_len 11: 3 matched + 8 drafted tokens): counting a 224-token stream
(a 128-token prompt and 96 outputs) into a new trie, as a request's trie catches up in one go; the same
stream one token a call, as it grows during decoding; and a draft of 8 tokens after a 100-token context.
Tokens are drawn from the default model's vocabulary (49,152), with a repeated span so that drafts exist.
Best of 5 repeats of each.
"""
import json
import random
import sys

from kernel_speeds import best_of   # this folder's timing helper

from kvloom.kernels import kernels
from kvloom.speculation.ngram_trie import NativeNGramTrie, NGramTrie


def main(out: str | None = None) -> None:
    rng = random.Random(0)
    head = [rng.randrange(49152) for _ in range(112)]
    stream = head + head[:20] + [rng.randrange(49152) for _ in range(92)]   # 224 tokens, a span repeated
    native = kernels()
    makers = {"python": lambda: NGramTrie(11), "native": lambda: NativeNGramTrie(11, native)}
    result = {"isa": native.isa(), "stream_tokens": len(stream), "max_len": 11}
    for name, make in makers.items():
        def whole():
            for _ in range(20):
                make().extend(stream)

        def one_at_a_time():
            trie, active = make(), None
            for i in range(len(stream)):
                active = trie.extend(stream[:i + 1], i, active)

        full = make()
        full.extend(stream)
        context = stream[:100] + head[:3]

        def drafts():
            for _ in range(200):
                assert full.draft(context, 8, 3, 2) is not None

        result[name] = {"us_a_token_in_one_go": round(best_of(whole, 5) / 20 / len(stream) * 1e6, 3),
                        "us_a_token_one_a_call": round(best_of(one_at_a_time, 5) / len(stream) * 1e6, 3),
                        "us_a_draft": round(best_of(drafts, 5) / 200 * 1e6, 2)}
        print(name, result[name])
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
