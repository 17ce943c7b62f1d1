"""gpucabac.fl.config: the run's settings, through Flower's flat run config and back."""

from __future__ import annotations

import pytest

from gpucabac.errors import InputError
from gpucabac.fl.config import FLConfig


def test_settings_survive_the_flat_record_and_toml_like_values():
    config = FLConfig(method="sparse", density=0.05, layers=("fc1", "fc2"), alpha=0.5, samples_per_client=300,
                      slice_size=None, error_feedback=False, num_rounds=3)
    record = config.to_record()
    assert all(isinstance(v, (bool, int, float, str)) and v != "" for v in record.values())  # Flower can carry each
    assert FLConfig.from_record(record) == config
    # what a run config written by hand looks like: strings for numbers, "none" for None
    assert FLConfig.from_record({"num-rounds": "4", "alpha": "none", "error-feedback": "false", "density": "0.1"}) == \
        FLConfig(num_rounds=4, alpha=None, error_feedback=False, density=0.1)
    assert FLConfig.from_record({"layers": "all"}).layers == ()


@pytest.mark.parametrize("record, field", [
    ({"method": "zip"}, "method"), ({"density": 0}, "density"), ({"density": 1.5}, "density"),
    ({"num-rounds": 0}, "num_rounds"), ({"num-rounds": "2.5"}, "num-rounds"), ({"placement": "rows"}, "placement"),
    ({"fraction-train": 0}, "fraction_train"), ({"alpha": -1}, "alpha"), ({"error-feedback": "maybe"}, "error-feedback"),
    ({"no-such-key": 1}, "no-such-key"),
])
def test_bad_settings_name_the_field(record, field):
    with pytest.raises(InputError, match=field):
        FLConfig.from_record(record)


def test_partial_updates_select_by_name_prefix():
    config = FLConfig(layers=("fc1", "convs/3/"))
    assert config.sends("fc1/kernel") and config.sends("convs/3/bias")
    assert not config.sends("fc10/kernel") and not config.sends("convs/0/kernel")
    assert FLConfig().sends("anything")
