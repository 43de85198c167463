"""Shared test helpers: the random valid E1TM checkpoint of arbs.testing.states as a fixture, and scheme_for."""

import numpy as np
import pytest

from arbs import formats, store
from arbs.testing.states import random_checkpoint


@pytest.fixture
def make_e1tm():
    """The ``arbs.testing.states.random_checkpoint`` factory, for tests that prefer a fixture."""
    return random_checkpoint


def scheme_for(format: str, rule: str, **params) -> formats.Scheme:
    """make_scheme with the parameters of ``params`` that ``rule`` takes (tests parametrized over rules)."""
    return formats.make_scheme(format, rule, **{k: v for k, v in params.items() if k in formats.rule_spec(rule).params})


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small corpus of Python-like words (a module overrides it with its own where it needs other text)."""
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "(", ")", ":", "\n"]
    p.write_text(" ".join(rng.choice(words, 6000)))
    return str(p)


def checkpoint_arrays(path):
    """(step_counter, {(tensor, array): array}) of the checkpoint ``path`` designates."""
    ck = store.open_checkpoint(path)
    return ck.step_counter, {(n, k): a for n, t in ck.tensors.items() for k, a in t.arrays.items()}
