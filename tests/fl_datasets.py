"""The skip marker of FL tests that need a real data set. scripts/setup.sh fetches them
(scripts/fetch_fl_data.sh), so CI runs these tests; only a missing or unreadable data file skips,
any other error of the loader fails the test that asked."""

from __future__ import annotations

import pytest

from gpucabac.errors import ModelFileError


def needs_dataset(name: str) -> pytest.MarkDecorator:
    from gpucabac.fl.data import load_dataset  # noqa: PLC0415  (after the tests' importorskip of flax)

    try:
        load_dataset(name)
    except ModelFileError as e:  # its message names the fetch command
        return pytest.mark.skip(reason=str(e))
    return pytest.mark.skipif(False, reason="")
