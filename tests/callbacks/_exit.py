"""Process exit for the distributed test scripts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def run_and_leave_the_group(main: Callable[..., Any], *args: Any) -> None:
    """``main(*args)``, then destroy the process group Lightning created and, once the work is done and written,
    leave without the interpreter's teardown: a gloo group's threads torn down there sometimes abort the process
    ("terminate called without an active exception": in two CI runs, sessions 14 and 16, after every result
    was saved)."""
    try:
        main(*args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # only reached when main() returned: a failure still raises, with its traceback and exit code
