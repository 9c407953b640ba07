"""Attention over the paged KV pool, behind one protocol (backend.py).

Three backends, tried in order for each step; the first that supports the step
builds its metadata and runs it:

    decode-stack   every decoder layer of a step of decodes (and short draft trees) in one native call
    native         decode rows through the native paged-attention kernel; prompt chunks through SDPA
    torch          decode rows gathered and batched in PyTorch; prompt chunks through SDPA
"""
