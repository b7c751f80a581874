"""Process exit for the distributed test scripts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def run_and_leave_the_group(main: Callable[..., Any], *args: Any) -> None:
    """``main(*args)``, then destroy the process group Lightning created: a gloo group left to the interpreter's
    exit sometimes aborts the process after the work is done ("terminate called without an active exception")."""
    try:
        main(*args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
