"""What one request may ask of the server: each limit is a `kvloom serve` flag, each breach a clear 4xx.

The engine's own ranges (sampling_params.py) say what is meaningful; these say what this server is willing
to spend on one client, so a single request cannot take the machine (a 100k-way n, 1000 stop strings
scanned at every token, a body of gigabytes, every stream slot held by one key).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvloom.errors import InvalidRequestError, PromptTooLongError


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 8 << 20        # a request body; more is answered 413 before it is read
    max_prompt_tokens: int | None = None    # per prompt; None: the model's context (less one generated token)
    max_tokens: int | None = None           # max_tokens / max_completion_tokens; None: whatever the context leaves
    max_n: int = 128                        # n, per prompt (OpenAI's own ceiling)
    max_logprobs: int = 20                  # top_logprobs (chat) and logprobs (completions)
    max_stop_strings: int = 16
    max_stop_length: int = 256              # characters of one stop string
    max_streams_per_key: int = 256          # streaming responses open at once per API key (or per server w/o keys)

    def check_body(self, body) -> None:
        """The request's fields against the limits (before anything is tokenized or queued)."""
        def over(field: str, value, limit, flag: str):
            raise InvalidRequestError(f"{field}={value} is above this server's limit of {limit} (--{flag})",
                                      field=field)

        if body.n > self.max_n:
            over("n", body.n, self.max_n, "max-n")
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, field, None)
            if value is not None and self.max_tokens is not None and value > self.max_tokens:
                over(field, value, self.max_tokens, "max-tokens-limit")
        for field in ("top_logprobs", "logprobs"):
            value = getattr(body, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_logprobs:
                over(field, value, self.max_logprobs, "max-logprobs")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > self.max_stop_strings:
            over("stop", f"[{len(stops)} strings]", self.max_stop_strings, "max-stop-strings")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_length:
            over("stop", f"[a string of {longest} characters]", self.max_stop_length, "max-stop-length")

    def check_prompts(self, prompt_lengths: list[int]) -> None:
        if self.max_prompt_tokens is None:
            return
        for n in prompt_lengths:
            if n > self.max_prompt_tokens:
                raise PromptTooLongError(f"the prompt has {n} tokens; this server takes at most "
                                         f"{self.max_prompt_tokens} (--max-prompt-tokens)")


class BodySizeLimit:
    """Pure ASGI middleware: a body over the limit is answered 413, by its Content-Length before a byte is
    read, else (chunked uploads) as soon as the bytes received pass it.

    Not FastAPI's max_body_size: Starlette answers a declared-too-large body there in plain text, and an
    OpenAI client should get OpenAI's error shape naming the flag to change."""

    def __init__(self, app, max_bytes: int, too_large):
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large    # () -> an ASGI response with the error body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self.too_large()(scope, receive, send)


class _TooLarge(BaseException):
    """A BaseException: FastAPI turns any Exception raised while it reads a body into its own 400."""
