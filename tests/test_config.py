"""SAEConfig validation and (de)serialisation."""

from __future__ import annotations

import pytest

from hsae_runtime import ConfigError, SAEConfig


def test_defaults_and_roundtrip() -> None:
    cfg = SAEConfig(d_in=8, d_sae=32, k_max=4, model_name="m", hookpoint="model.layers.1")
    assert cfg.budgets == (1, 2, 3, 4)
    assert cfg.apply_b_dec_to_input is True and cfg.dtype == "float32"
    again = SAEConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_budgets_are_sorted_and_deduplicated() -> None:
    assert SAEConfig(d_in=8, d_sae=32, k_max=8, budgets=(8, 2, 2, 4)).budgets == (2, 4, 8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d_in": 0}, "d_in"),
        ({"d_sae": -3}, "d_sae"),
        ({"k_max": 2.0}, "k_max"),
        ({"k_max": 64, "d_sae": 32}, "k_max"),
        ({"budgets": (0, 2)}, "budgets"),
        ({"budgets": (5,)}, "budgets"),
        ({"budgets": ()}, "budgets"),
        ({"dtype": "float64"}, "dtype"),
        ({"normalization_scale": -1.0}, "normalization_scale"),
        ({"normalization_scale": float("nan")}, "normalization_scale"),
        # values a model file's JSON can carry where another type belongs
        ({"budgets": 5}, "budgets"),
        ({"budgets": [1, float("inf")]}, "budgets"),
        ({"budgets": [1.5]}, "budgets"),
        ({"budgets": [True]}, "budgets"),
        ({"normalization_scale": "abc"}, "normalization_scale"),
        ({"normalization_scale": [1]}, "normalization_scale"),
        ({"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input"),
        ({"dtype": ["float32"]}, "dtype"),
        ({"model_name": 7}, "model_name"),
        ({"hookpoint": [1]}, "hookpoint"),
        ({"d_sae": 2**40}, "d_sae"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    base = {"d_in": 8, "d_sae": 32, "k_max": 4}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        SAEConfig(**base)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 32, "k_max": 4, "typo": 1})
    with pytest.raises(ConfigError, match="missing"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 32})
    with pytest.raises(ConfigError, match="JSON object"):
        SAEConfig.from_dict([1, 2])  # type: ignore[arg-type]
