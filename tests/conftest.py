"""Shared test helpers."""

import importlib
import os

import pytest


def optional(name: str):
  """Import an optional dependency (torch, peft, qwix): a skip locally when it is missing, an
  ImportError (a failure) when CI sets LORA_JAX_REQUIRE_INTEROP=1, so CI never counts a skip."""
  if os.environ.get("LORA_JAX_REQUIRE_INTEROP") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)
