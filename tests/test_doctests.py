"""The runnable examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest

import pytest

import lightning_compress.core.compact


@pytest.mark.parametrize("module", [lightning_compress.core.compact])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
