"""Typed errors of the public API.

Every error raised for bad input names the offending field and, where there is one, the allowed
range or the valid choices, so that the CLI, the Python API and (later) the server can report it
without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence


class AccelDiffusionError(Exception):
    """Base class of every error this package raises on purpose."""

    error_type = "internal_error"


class InvalidRequestError(AccelDiffusionError):
    """A request field is missing, malformed or out of range.

    Deliberately not a ValueError: raised inside a pydantic validator it propagates unchanged
    instead of being folded into a generic validation error.
    """

    error_type = "invalid_request_error"

    def __init__(self, field: str, message: str, allowed: str | Sequence[str] | None = None) -> None:
        self.field = field
        self.message = message
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(repr(a) for a in allowed)
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)

    def to_dict(self) -> dict[str, str | None]:
        return {"type": self.error_type, "field": self.field, "message": self.message, "allowed": self.allowed}


class UnknownFieldError(InvalidRequestError):
    """A request names a field its surface does not take; the message suggests the closest accepted
    name ("did you mean `steps`?") and ``allowed`` lists them all."""

    def __init__(self, field: str, accepted: Collection[str], what: str = "field") -> None:
        close = difflib.get_close_matches(field, sorted(accepted), n=1, cutoff=0.6)
        self.suggestion = close[0] if close else None
        hint = f"; did you mean `{self.suggestion}`?" if self.suggestion else ""
        super().__init__(field, f"unknown {what}{hint}", sorted(accepted))


class UnknownModelError(InvalidRequestError):
    """The request names a model that is not in the model registry."""

    error_type = "model_not_found"


class UnknownComponentError(InvalidRequestError):
    """A strategy names a component that is not registered for its kind."""


class IncompatibleStrategyError(InvalidRequestError):
    """Two components of a strategy, or a component and the model, cannot work together."""


class ModelLoadError(AccelDiffusionError):
    """A model's files are missing, unsafe (pickle weights) or not a supported pipeline."""

    error_type = "model_load_error"


class GenerationCancelled(AccelDiffusionError):
    """Cooperative cancellation: raised by the engine at the first step boundary after a cancel."""

    error_type = "cancelled"

    def __init__(self, step: int, total: int) -> None:
        self.step = step
        self.total = total
        super().__init__(f"generation cancelled before step {step + 1} of {total}")
