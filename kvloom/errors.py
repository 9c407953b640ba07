"""Typed errors a user can cause. Each says what went wrong and what to do.

None of them takes the engine down: a request that raises one is refused
before it touches the scheduler or the KV pool.
"""


class KvloomError(Exception):
    """Base of every error kvloom raises on purpose."""


class ModelNotFoundError(KvloomError, FileNotFoundError):
    """The model path does not exist or holds no loadable model."""


class UnsupportedArchitectureError(KvloomError, ValueError):
    """The model's architecture is not one kvloom implements."""


class WeightsError(KvloomError, ValueError):
    """A weight file is missing, truncated, or does not match the config."""


class InvalidRequestError(KvloomError, ValueError):
    """A request's input is invalid. `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFoundError(InvalidRequestError):
    """The request names a resource (file, job) this server does not have: servers answer 404."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt cannot fit the model's context (or the KV pool)."""

    def __init__(self, message: str, field: str | None = "prompt"):
        super().__init__(message, field)


class RequestFailedError(KvloomError):
    """The engine ended this request on an internal fault (an error in its step, non-finite logits); the
    other requests go on. Not the client's fault: servers answer 500."""
