"""The examples in the public docstrings run and print what they claim."""

import doctest

import pytest

import altgrad.sign_optim
import altgrad.sign_optim.addsign
import altgrad.sign_optim.powersign
import altgrad.sign_optim.sign_internal_decay


@pytest.mark.parametrize(
    "module",
    [
        altgrad.sign_optim,
        altgrad.sign_optim.addsign,
        altgrad.sign_optim.powersign,
        altgrad.sign_optim.sign_internal_decay,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_names_are_documented():
    for name in altgrad.sign_optim.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(altgrad.sign_optim, name)
        assert obj.__doc__, name
        assert len(obj.__doc__.strip()) > 40, name
