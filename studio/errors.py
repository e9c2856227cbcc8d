"""How the studio answers a failure: always in its own words, never a traceback or Gradio's generic message.

* A person's mistake (a ``ValueError`` from the studio or the engine: a bad file, a script error, an option out of
  range) is shown as it is and logged as one line.
* Running out of memory gets what happened and what to try.
* Anything else is a fault of ours: the log gets the traceback, the person a short message saying their story is
  kept and what to try.

Handlers change the story only after their work succeeded (or per finished batch), so a failure never loses work.
"""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from .service import Cancelled

log = logging.getLogger("serialgen.studio")

OUT_OF_MEMORY = ("The {device} ran out of memory. Your story is kept. Try fewer steps or fewer panels at once, "
                 "close other programs using the {device}, or restart the studio with --low-vram.")
FAULT = ("Something went wrong inside the studio ({kind}). Your story is kept; try again, and if it happens again, "
         "report it with the server log.")


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def message(exc: BaseException, where: str) -> gr.Error:
    """The ``gr.Error`` to show for ``exc`` raised in the event ``where`` (logging it as above)."""
    if isinstance(exc, ValueError):
        log.info("%s refused: %s", where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return gr.Error(str(exc), print_exception=False)
    if _is_out_of_memory(exc):
        log.error("%s: out of memory (%s)", where, exc)
        device = "GPU" if "cuda" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError" else "computer"
        return gr.Error(OUT_OF_MEMORY.format(device=device), print_exception=False)
    log.exception("%s failed", where)
    return gr.Error(FAULT.format(kind=type(exc).__name__), print_exception=False)


def friendly(fn):
    """Wraps an event handler (function or generator) so every failure reaches the person as a clear message; a
    cancelled run ends quietly."""
    where = fn.__name__

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Cancelled:
                log.info("%s cancelled", where)
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure gets a message
                raise message(exc, where) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Cancelled:
            log.info("%s cancelled", where)
            raise gr.Error("Cancelled: nothing was changed.", print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets a message
            raise message(exc, where) from None
    return wrapper
