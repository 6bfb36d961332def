"""Keeping the console for what concerns a user: third-party notices that do not, by logger and message.

Loading a model through diffusers and transformers prints, on every ``generate`` and ``serve``:

- diffusers' advice to install ``accelerate`` for ``low_cpu_mem_usage`` loading, once per model file, with
  a markdown block: loading works the same without it (it only lowers the peak memory while loading);
- transformers' notices that image processors fall back to PIL without ``torchvision``: they belong to a
  pipeline's safety-checker feature extractor, which the engine never runs;
- diffusers' "Loading pipeline components" and transformers' "Loading weights" progress bars (not the hub's
  download bars), which the commands replace with lines of their own ("loading shapes…", "loaded shapes in 0.6 s").

``quiet_third_party_output`` drops exactly those records (any other warning of the same loggers still
shows) and turns off those two libraries' loading bars. The commands call it; the library itself does not
touch logging, so a program that imports it keeps the libraries' output as it configured it.
"""

from __future__ import annotations

import logging
from typing import Any

# logger name -> the start of each message of it that does not concern a user of accel-diffusion
IRRELEVANT_MESSAGES: dict[str, tuple[str, ...]] = {
    "diffusers.models.modeling_utils": ("Cannot initialize model with low cpu memory usage because `accelerate`",),
    "diffusers.pipelines.pipeline_utils": ("Cannot initialize model with low cpu memory usage because `accelerate`",),
    "transformers.utils.import_utils": ("`CLIPImageProcessor` requires torchvision (not installed)",
                                        "`SiglipImageProcessor` requires torchvision (not installed)"),
}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_third_party_output() -> None:
    """Drop the notices of ``IRRELEVANT_MESSAGES`` and the loading progress bars (idempotent)."""
    for name, prefixes in IRRELEVANT_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()  # its own bars only: hub downloads keep theirs
    # transformers' disable_progress_bar() would also hide hub downloads (minutes for a real model): hide one bar
    set_hook = getattr(transformers.utils.logging, "set_tqdm_hook", None)  # transformers >= 5
    if set_hook is not None:
        previous = set_hook(_without_loading_weights_bar)
        if previous not in (None, _without_loading_weights_bar):
            set_hook(previous)  # someone else's hook: leave it


def _without_loading_weights_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its "Loading weights" bar is made disabled, every other bar as asked."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)
