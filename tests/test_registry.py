"""Tests for `flowtrain.registry.Registry`."""

from __future__ import annotations

import json
import os.path

import pytest

from flowtrain.registry import ImportStringError, Registry, UnknownNameError


@pytest.fixture
def losses() -> Registry[type]:
    reg: Registry[type] = Registry("loss")

    @reg.register("flow_matching")
    class FlowMatching:
        pass

    @reg.register("mse")
    class Mse:
        pass

    return reg


def test_register_returns_object_and_get_finds_it() -> None:
    reg: Registry[object] = Registry("thing")

    def fn() -> int:
        return 1

    assert reg.register("fn")(fn) is fn  # the decorator must not wrap or replace
    assert reg.get("fn") is fn
    assert "fn" in reg and "other" not in reg


def test_names_are_sorted(losses: Registry[type]) -> None:
    assert losses.names() == ["flow_matching", "mse"]


def test_unknown_name_suggests_closest_and_lists_known(losses: Registry[type]) -> None:
    with pytest.raises(UnknownNameError) as exc:
        losses.get("flow_matchin")
    message = str(exc.value)
    assert isinstance(exc.value, KeyError)
    assert "unknown loss 'flow_matchin'" in message
    assert "did you mean 'flow_matching'?" in message
    assert "flow_matching, mse" in message
    assert not message.startswith(("'", '"'))  # KeyError's quoting is undone


def test_unknown_name_without_close_match_still_lists_known(losses: Registry[type]) -> None:
    with pytest.raises(KeyError) as exc:
        losses.get("zzz")
    assert "did you mean" not in str(exc.value)
    assert "known loss names: flow_matching, mse" in str(exc.value)


def test_empty_registry_message() -> None:
    with pytest.raises(UnknownNameError, match="no model names are registered"):
        Registry("model").get("x")


def test_duplicate_name_is_rejected_but_reregistering_same_object_is_fine(losses: Registry[type]) -> None:
    same = losses.get("mse")
    losses.register("mse")(same)  # e.g. a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        losses.register("mse")(int)
    assert losses.get("mse") is same


@pytest.mark.parametrize("name", ["", "pkg:Thing"])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid loss name"):
        Registry("loss").register(name)


def test_import_string(losses: Registry[type]) -> None:
    assert losses.get("json:dumps") is json.dumps
    assert losses.get("os.path:join") is os.path.join
    assert losses.get("json:JSONDecoder.decode") is json.JSONDecoder.decode  # dotted attribute


def test_import_string_missing_module(losses: Registry[type]) -> None:
    with pytest.raises(ImportStringError, match="cannot import module 'no_such_pkg_xyz.mod' for loss") as exc:
        losses.get("no_such_pkg_xyz.mod:Thing")
    assert isinstance(exc.value.__cause__, ImportError)


def test_import_string_missing_attribute(losses: Registry[type]) -> None:
    with pytest.raises(ImportStringError, match="has no attribute 'nope'"):
        losses.get("json:nope")


@pytest.mark.parametrize("spec", ["json:", ":dumps"])
def test_malformed_import_string(losses: Registry[type], spec: str) -> None:
    with pytest.raises(ImportStringError, match="malformed loss import string"):
        losses.get(spec)
