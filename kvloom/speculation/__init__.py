"""Lookahead speculative decoding: n-gram drafts verified by the target model in one pass."""
