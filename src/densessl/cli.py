"""What every entry point (``experiments/train.py``, ``evaluation/*.py``) shares: user errors become a
one-line message and exit status 2 instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from densessl.methods.base import NonFiniteLossError
from densessl.models import WeightsError

__all__ = ["config_groups", "exit_on_user_error"]

# Errors caused by input: missing data, bad weights, bad options, a non-finite loss.
USER_ERRORS = (FileNotFoundError, WeightsError, NonFiniteLossError, ValueError)


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Entry-point decorator: errors caused by input (missing data, bad weights, bad options, a
    non-finite loss) print their message, which names the fix, and exit with status 2 instead of a
    traceback. ``DENSESSL_DEBUG=1`` re-raises them with the traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            cause: BaseException | None = err  # Hydra wraps errors raised inside instantiate()
            while cause is not None and not isinstance(cause, USER_ERRORS):
                cause = cause.__cause__
            if cause is None or os.environ.get("DENSESSL_DEBUG"):
                raise
            print(f"\nerror: {_message(cause)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _message(err: BaseException) -> str:
    """The error's own message: one re-raised from a DataLoader worker carries the worker's traceback
    ("Caught X in DataLoader worker process N. Original Traceback ..."), whose last entry is the message."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        return text[text.rfind(marker) + len(marker):].strip()
    return text


def config_groups(*groups: str) -> str:
    """``${densessl.config_groups:a,b}`` in an entry point's ``--help`` template: one line per config
    group that applies to it, with the group's options as Hydra finds them (Hydra's own
    ``$APP_CONFIG_GROUPS`` lists every group of the config folder, the other entry points' too)."""
    import textwrap

    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return "\n".join(textwrap.fill(f"{group}: {', '.join(loader.get_group_options(group))}", width=100,
                                   initial_indent="  ", subsequent_indent="      ") for group in groups)


if not OmegaConf.has_resolver("densessl.config_groups"):
    OmegaConf.register_new_resolver("densessl.config_groups", config_groups)
