"""Only the third-party notices that do not concern a user are dropped (the commands' real output is
checked end to end in tests/cli/test_cli.py)."""

from __future__ import annotations

import logging

from log_messages import CollectMessages

from accel_diffusion.third_party_output import IRRELEVANT_MESSAGES, quiet_third_party_output


def test_the_listed_notices_are_dropped_and_every_other_warning_of_those_loggers_shows() -> None:
    quiet_third_party_output()
    quiet_third_party_output()  # idempotent: one filter per logger
    collect = CollectMessages()
    for name, prefixes in IRRELEVANT_MESSAGES.items():
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "DropMessages" for f in logger.filters) == 1
        logger.addHandler(collect)
        try:
            for prefix in prefixes:
                logger.warning("%s; and more", prefix)
            logger.warning("a warning that concerns the user, from %s", name)
            logger.error("%s, but as the text of another message", prefixes[0][:20])
        finally:
            logger.removeHandler(collect)
    assert collect.messages == [m for name, prefixes in IRRELEVANT_MESSAGES.items() for m in (
        f"a warning that concerns the user, from {name}", f"{prefixes[0][:20]}, but as the text of another message")]


def test_only_the_loading_weights_bar_of_transformers_is_hidden() -> None:
    from transformers.utils.logging import tqdm

    quiet_third_party_output()
    with tqdm(range(3), desc="Loading weights") as loading, tqdm(range(3), desc="Downloading") as downloading:
        assert loading.disable is True and downloading.disable is False
