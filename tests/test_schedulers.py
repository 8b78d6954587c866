import pytest

from triton_backend.errors import InvalidRequestError
from triton_backend.schedulers import SCHEDULERS, make_scheduler
from triton_backend.schema import SCHEDULER_NAMES


def test_table_matches_schema():
    assert tuple(SCHEDULERS) == SCHEDULER_NAMES
    assert {"euler", "euler_a", "ddim", "dpmpp_2m"} <= set(SCHEDULERS)


def test_each_name_builds_its_class_and_default_is_the_model_scheduler(model_dir):
    from triton_backend.model_info import ModelInfo

    config = ModelInfo.read(model_dir).scheduler_config
    for name, cls in SCHEDULERS.items():
        sched = make_scheduler(name, config)
        expected = cls.__name__ if cls is not None else config["_class_name"]
        assert type(sched).__name__ == expected
        assert sched.config.beta_schedule == config["beta_schedule"]


def test_each_call_returns_a_fresh_instance(model_dir):
    from triton_backend.model_info import ModelInfo

    config = ModelInfo.read(model_dir).scheduler_config
    assert make_scheduler("euler", config) is not make_scheduler("euler", config)


def test_unknown_name_is_invalid_and_lists_names():
    with pytest.raises(InvalidRequestError, match="ddim"):
        make_scheduler("nope", {})
