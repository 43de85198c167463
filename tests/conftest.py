"""Shared test helpers: the random valid E1TM checkpoint of arbs.testing.states as a fixture, and scheme_for."""

import pytest

from arbs import formats
from arbs.testing.states import random_checkpoint


@pytest.fixture
def make_e1tm():
    """The ``arbs.testing.states.random_checkpoint`` factory, for tests that prefer a fixture."""
    return random_checkpoint


def scheme_for(format: str, rule: str, **params) -> formats.Scheme:
    """make_scheme with the parameters of ``params`` that ``rule`` takes (tests parametrized over rules)."""
    return formats.make_scheme(format, rule, **{k: v for k, v in params.items() if k in formats.rule_spec(rule).params})
