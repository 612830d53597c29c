import json
import math

import jax
import numpy as np
import pytest

import lora_jax as lj


NAN, INF = float("nan"), float("inf")
RANK, ALPHA = "must be a positive integer", "must be a finite number > 0"

# (field, value, exception, message regex): every bad value is refused, never coerced, with the
# field named in the message.
BAD = [
    ("rank", 0, ValueError, r"LoraConfig\.rank " + RANK),
    ("rank", -3, ValueError, r"LoraConfig\.rank " + RANK),
    ("rank", 2.5, TypeError, r"LoraConfig\.rank " + RANK + r".*float"),
    ("rank", 4.0, TypeError, r"LoraConfig\.rank " + RANK + r".*float"),
    ("rank", True, TypeError, r"LoraConfig\.rank " + RANK + r".*bool"),
    ("rank", "4", TypeError, r"LoraConfig\.rank " + RANK + r".*str"),
    ("rank", None, TypeError, r"LoraConfig\.rank " + RANK + r".*NoneType"),
    ("rank", NAN, TypeError, r"LoraConfig\.rank " + RANK),
    ("rank", [4], TypeError, r"LoraConfig\.rank " + RANK + r".*list"),
    ("alpha", 0.0, ValueError, r"LoraConfig\.alpha " + ALPHA),
    ("alpha", -1, ValueError, r"LoraConfig\.alpha " + ALPHA),
    ("alpha", NAN, ValueError, r"LoraConfig\.alpha " + ALPHA + ", got nan"),
    ("alpha", INF, ValueError, r"LoraConfig\.alpha " + ALPHA + ", got inf"),
    ("alpha", 10 ** 400, ValueError, r"LoraConfig\.alpha " + ALPHA + ", got 1000"),
    ("alpha", "16", TypeError, r"LoraConfig\.alpha " + ALPHA + r".*'16'.*str"),
    ("alpha", True, TypeError, r"LoraConfig\.alpha " + ALPHA + r".*bool"),
    ("alpha", None, TypeError, r"LoraConfig\.alpha " + ALPHA + r".*NoneType"),
    ("alpha", [16.0], TypeError, r"LoraConfig\.alpha " + ALPHA + r".*list"),
    ("dropout", 1.0, ValueError, r"LoraConfig\.dropout must be in \[0, 1\)"),
    ("dropout", -0.1, ValueError, r"LoraConfig\.dropout must be in \[0, 1\)"),
    ("dropout", NAN, ValueError, r"LoraConfig\.dropout must be a number in \[0, 1\)"),
    ("dropout", INF, ValueError, r"LoraConfig\.dropout must be a number in \[0, 1\)"),
    ("dropout", "0.1", TypeError, r"LoraConfig\.dropout .*str"),
    ("dropout", False, TypeError, r"LoraConfig\.dropout .*bool"),
    ("dropout", None, TypeError, r"LoraConfig\.dropout .*NoneType"),
    ("scaling", "sqrt", ValueError, r"LoraConfig\.scaling must be one of"),
    ("scaling", None, TypeError, r"LoraConfig\.scaling must be one of"),
    ("scaling", ["standard"], TypeError, r"LoraConfig\.scaling must be one of.*list"),
    ("init", "zeros", ValueError, r"LoraConfig\.init must be one of"),
    ("init", 0, TypeError, r"LoraConfig\.init must be one of.*int"),
    ("targets", "(unclosed", ValueError, r"LoraConfig\.targets: invalid regex '\(unclosed'"),
    ("targets", (), ValueError, r"LoraConfig\.targets: give at least one regex"),
    ("targets", None, TypeError, r"LoraConfig\.targets: expected a regex string"),
    ("targets", 3, TypeError, r"LoraConfig\.targets: expected a regex string"),
    ("targets", {".*"}, TypeError, r"LoraConfig\.targets: expected a regex string.*set"),
    ("targets", [".*", 1], TypeError, r"LoraConfig\.targets\[1\]: expected a regex string"),
    ("exclude", None, TypeError, r"LoraConfig\.exclude: expected a regex string"),
    ("exclude", ["a", "[b"], ValueError, r"LoraConfig\.exclude\[1\]: invalid regex '\[b'"),
    ("rank_pattern", {"a": 0}, ValueError, r"LoraConfig\.rank_pattern\['a'\] " + RANK),
    ("rank_pattern", {".*": 2.7}, TypeError, r"LoraConfig\.rank_pattern\['\.\*'\] " + RANK),
    ("rank_pattern", {".*": 2.0}, TypeError, r"LoraConfig\.rank_pattern\['\.\*'\] " + RANK),
    ("rank_pattern", {".*": True}, TypeError, r"LoraConfig\.rank_pattern\['\.\*'\] " + RANK),
    ("rank_pattern", {".*": "2"}, TypeError, r"LoraConfig\.rank_pattern\['\.\*'\] " + RANK),
    ("rank_pattern", {".*": None}, TypeError, r"LoraConfig\.rank_pattern\['\.\*'\] " + RANK),
    ("rank_pattern", {"(": 2}, ValueError, r"LoraConfig\.rank_pattern\['\('\]: invalid regex"),
    ("rank_pattern", {1: 2}, TypeError, r"LoraConfig\.rank_pattern\[1\]: expected a regex"),
    ("rank_pattern", None, TypeError, r"LoraConfig\.rank_pattern: expected a \{regex: value\}"),
    ("rank_pattern", [("a",)], TypeError, r"LoraConfig\.rank_pattern\[0\]: expected a \(regex"),
    ("alpha_pattern", {"a": -1}, ValueError, r"LoraConfig\.alpha_pattern\['a'\] " + ALPHA),
    ("alpha_pattern", {".*": NAN}, ValueError, r"LoraConfig\.alpha_pattern\['\.\*'\] " + ALPHA),
    ("alpha_pattern", {".*": INF}, ValueError, r"LoraConfig\.alpha_pattern\['\.\*'\] " + ALPHA),
    ("alpha_pattern", {".*": "4"}, TypeError, r"LoraConfig\.alpha_pattern\['\.\*'\] " + ALPHA),
    ("alpha_pattern", {".*": True}, TypeError, r"LoraConfig\.alpha_pattern\['\.\*'\] " + ALPHA),
    ("alpha_pattern", {".*": None}, TypeError, r"LoraConfig\.alpha_pattern\['\.\*'\] " + ALPHA),
    ("alpha_pattern", "a", TypeError, r"LoraConfig\.alpha_pattern: expected a \{regex: value\}"),
]


@pytest.mark.parametrize("field, value, exc, match", BAD,
                         ids=[f"{f}={v!r:.30}" for f, v, _, _ in BAD])
def test_invalid_config_raises_naming_the_field(field, value, exc, match):
  with pytest.raises(exc, match=match) as info:
    lj.LoraConfig(**{"targets": ".*", field: value})
  assert type(info.value) is exc  # not a subclass that happens to match


def _json_exact(value):
  """True if `value` survives a JSON round trip unchanged (so it can be tested through JSON)."""
  try:
    return json.loads(json.dumps(value)) == value
  except TypeError:
    return False


@pytest.mark.parametrize("field, value, exc, match", [b for b in BAD if _json_exact(b[1])],
                         ids=[f"{f}={v!r:.30}" for f, v, _, _ in BAD if _json_exact(v)])
def test_invalid_json_values_raise_naming_the_field(field, value, exc, match):
  """The same checks apply to a config read from JSON (strings stay strings, no coercion)."""
  text = json.dumps({"targets": [".*"], field: value})
  with pytest.raises(exc, match=match):
    lj.LoraConfig.from_json(text)


def test_valid_numbers_are_normalised_not_refused():
  c = lj.LoraConfig(targets=".*", rank=np.int64(4), alpha=np.float32(8.0), dropout=0,
                    rank_pattern={"a": np.int32(2)}, alpha_pattern={"a": 3})
  assert (c.rank, c.alpha, c.dropout) == (4, 8.0, 0.0)
  assert type(c.rank) is int and type(c.alpha) is float and type(c.dropout) is float
  assert c.rank_pattern == (("a", 2),) and type(c.rank_pattern[0][1]) is int
  assert c.alpha_pattern == (("a", 3.0),) and type(c.alpha_pattern[0][1]) is float
  assert c == lj.LoraConfig(targets=".*", rank=4, alpha=8, rank_pattern=[("a", 2)],
                            alpha_pattern=(("a", 3.0),))


def test_from_json_and_from_dict_refuse_unknown_keys():
  with pytest.raises(ValueError, match=r"LoraConfig\.from_dict: unknown field 'rnak'"):
    lj.LoraConfig.from_json(json.dumps({"targets": ".*", "rnak": 4}))
  with pytest.raises(ValueError, match=r"unknown field 'lora_alpha'"):
    lj.LoraConfig.from_dict({"targets": ".*", "lora_alpha": 4})
  with pytest.raises(TypeError, match=r"LoraConfig\.from_dict: expected a \{field: value\} dict"):
    lj.LoraConfig.from_json("[1, 2]")
  with pytest.raises(ValueError):  # json.JSONDecodeError
    lj.LoraConfig.from_json("{targets: 1}")


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
