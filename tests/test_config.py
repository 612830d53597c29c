import math

import jax
import pytest

import lora_jax as lj


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(rank=True), "rank must be a positive integer"),
    (dict(alpha=0.0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(scaling="sqrt"), "scaling must be one of"),
    (dict(init="zeros"), "init must be one of"),
    (dict(targets="(unclosed"), "invalid regex '\\(unclosed'"),
    (dict(targets=()), "give at least one regex"),
    (dict(rank_pattern={"a": 0}), r"rank_pattern\['a'\] must be a positive integer"),
    (dict(alpha_pattern={"a": -1}), r"alpha_pattern\['a'\] must be"),
])
def test_invalid_config_raises_naming_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lj.LoraConfig(**{"targets": ".*", **kwargs})


def test_scale_standard_and_rslora():
  assert lj.LoraConfig(targets=".*", rank=4, alpha=8.0).scale_for("x") == 2.0
  assert lj.LoraConfig(targets=".*", rank=4, alpha=8.0, scaling="rslora").scale_for("x") == 4.0
  c = lj.LoraConfig(targets=".*", rank=9, alpha=6.0, scaling="rslora")
  assert math.isclose(c.scale_for("x"), 2.0)


def test_patterns_first_match_wins_and_exclusion_wins():
  c = lj.LoraConfig(targets=r".*/kernel", rank=8, alpha=16.0, exclude=[r".*/head/kernel"],
                    rank_pattern={r".*/q/kernel": 2, r".*/(q|k)/kernel": 4},
                    alpha_pattern={r".*/k/kernel": 1.0})
  assert c.rank_for("a/q/kernel") == 2 and c.rank_for("a/k/kernel") == 4
  assert c.rank_for("a/v/kernel") == 8
  assert c.alpha_for("a/k/kernel") == 1.0 and c.alpha_for("a/q/kernel") == 16.0
  assert c.selects("a/q/kernel") and not c.selects("a/head/kernel") and not c.selects("a/q/bias")


def test_json_round_trip_and_hashable():
  c = lj.LoraConfig(targets=[r".*/q/kernel", r".*/v/kernel"], rank=4, alpha=8, dropout=0.1,
                    scaling="rslora", init="gaussian", rank_pattern={r".*/q/kernel": 2})
  c2 = lj.LoraConfig.from_json(c.to_json())
  assert c2 == c and hash(c2) == hash(c)
  # usable as a static jit argument
  f = jax.jit(lambda x, cfg: x * cfg.rank, static_argnums=1)
  assert int(f(1, c)) == 4
