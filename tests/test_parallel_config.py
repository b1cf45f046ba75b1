"""The checks of the `parallel.*` config fields: each bad value is a `ConfigError` naming the field,
the value and what is allowed, before any compute; the good ones pass."""

import pytest

from jackpots_jax.experiment import config as config_lib


def _check(num_devices=8, **parallel):
    config = config_lib.base_config()
    for field, value in parallel.items():
        config.parallel[field] = value
    config_lib.check(config, num_devices=num_devices, modes=("jackpot",))


@pytest.mark.parametrize(
    "parallel",
    [
        {},
        {"backend": "pmap"},
        {"backend": "jit", "fsdp": 8},
        {"fsdp": 4},  # the default backend, 'auto', runs sharded state under jit by itself
        {"backend": "jit", "fsdp": 2, "data": 4},
        {"backend": "jit", "fsdp": 4, "rules": ("head/kernel=none", "conv.*=3")},
    ],
)
def test_good_parallel_fields_pass(parallel):
    _check(**parallel)


@pytest.mark.parametrize(
    "parallel, message",
    [
        ({"backend": "gspmd"}, "`parallel.backend` is 'gspmd'; allowed:"),
        ({"backend": "jit", "fsdp": 3}, "`parallel.fsdp` is 3; allowed: a divisor of the 8"),
        ({"backend": "jit", "fsdp": 0}, "`parallel.fsdp` is 0"),
        (
            {"backend": "jit", "fsdp": 2, "data": 2},
            "`parallel.data` is 2; allowed: 0 (all devices not on 'fsdp') or 4",
        ),
        (
            {"backend": "shard_map", "fsdp": 2},
            "`parallel.backend` is 'shard_map'; allowed: 'auto' or 'jit'",
        ),
        ({"backend": "pmap", "fsdp": 4}, "pmap and shard_map run data parallelism only"),
        ({"rules": ("head/kernel",)}, "`parallel.rules` is ('head/kernel',)"),
        ({"rules": ("head/kernel=two",)}, "'pattern=dim' entries"),
        ({"rules": ("(=0",)}, "`parallel.rules` is ('(=0',)"),
    ],
)
def test_bad_parallel_fields_are_config_errors(parallel, message):
    with pytest.raises(config_lib.ConfigError) as e:
        _check(**parallel)
    assert message in str(e.value)
    assert "parallel." in str(e.value)


def test_rules_parse_to_pattern_and_dimension():
    """`'pattern=dim'`: the last `=` splits (a pattern may hold one), `none` replicates."""
    assert config_lib.parse_rules(("head/kernel=none", "a=b=1", "conv=-1")) == (
        ("head/kernel", None),
        ("a=b", 1),
        ("conv", -1),
    )
    assert config_lib.parse_rules(()) == ()
