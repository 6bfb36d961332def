"""One request vocabulary for every surface (HTTP routes, WebSocket streams, CLI, batch manifests, SDK).

The canonical names are the engine's (``GenerationRequest``): ``steps``, ``width``/``height``, ``n``,
``seed``, ``negative_prompt``, ``guidance_scale``. Every surface also accepts the OpenAI/diffusers
spellings of the same things:

    num_inference_steps    -> steps
    size ("WxH" | "auto")  -> width, height
    num_images_per_prompt  -> n

Giving one thing under two names is an error, a field nobody takes is answered with the closest
accepted name ("did you mean `steps`?"), and an error about an aliased value names the field as the
user sent it (a bad ``size`` names ``size``, not ``width``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from accel_diffusion.errors import InvalidRequestError, UnknownFieldError

ALIASES: dict[str, tuple[str, ...]] = {
    "num_inference_steps": ("steps",),
    "size": ("width", "height"),
    "num_images_per_prompt": ("n",),
}


def aliases_for(fields: Iterable[str]) -> set[str]:
    """The aliases a surface taking these canonical ``fields`` also accepts."""
    names = set(fields)
    return {alias for alias, targets in ALIASES.items() if set(targets) <= names}


def check_known(data: Iterable[str], accepted: Collection[str]) -> None:
    """Refuse the first name of ``data`` that is not ``accepted``, suggesting the closest one."""
    for name in data:
        if name not in accepted:
            raise UnknownFieldError(str(name), accepted)


def parse_size(size: str | None, allow_auto: bool = True) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" -> (W, H); None (or "auto", where allowed): the model's default size."""
    if size is None or (allow_auto and size == "auto"):
        return None, None
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*x\s*([0-9]{1,6})\s*", size.lower()) if isinstance(size, str) else None
    if match is None:  # ASCII digits only: "²x²" passes str.isdigit() but not int()
        choices = "'512x512' or 'auto'" if allow_auto else "'512x512'"
        raise InvalidRequestError("size", f"must look like {choices}, got {size!r}")
    return int(match[1]), int(match[2])


def to_canonical(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with its aliases replaced by their canonical fields, and ``{canonical: name sent}``.

    A value of None counts as not given (the request models' unset fields)."""
    fields = dict(data)
    sent: dict[str, str] = {}
    for alias, targets in ALIASES.items():
        value = fields.pop(alias, None)
        if value is None:
            continue
        if any(fields.get(target) is not None for target in targets):
            raise InvalidRequestError(alias, f"give either {alias} or {'/'.join(targets)}, not both")
        values = parse_size(value) if alias == "size" else (value,)
        for target, target_value in zip(targets, values, strict=True):
            fields[target] = target_value
            sent[target] = alias
    return fields, sent


def named_as_sent(error: InvalidRequestError, sent: Mapping[str, str]) -> InvalidRequestError:
    """``error`` about a canonical field, renamed to the alias it was sent as ("size: height must be ...")."""
    alias = sent.get(error.field)
    if alias is None:
        return error
    message = error.message
    if len(ALIASES[alias]) > 1 and not message.startswith(error.field):
        message = f"{error.field} {message}"
    renamed = type(error).__new__(type(error))  # the same type (UnknownModelError, ...) and attributes
    renamed.__dict__.update(error.__dict__)
    InvalidRequestError.__init__(renamed, alias, message, error.allowed)
    return renamed


@contextmanager
def errors_named_as_sent(sent: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an InvalidRequestError about an aliased field under the name the user sent."""
    try:
        yield
    except InvalidRequestError as exc:
        renamed = named_as_sent(exc, sent)
        if renamed is exc:
            raise
        raise renamed from None
