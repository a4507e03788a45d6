"""The installed package reports the version its wheel was built with."""

import re
from importlib.metadata import version

import altgrad.discounted_cumsum as pkg

# PEP 440 public version with optional dev/local parts (setuptools-scm output).
_PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9.]+)?$")


def test_version_matches_metadata():
    assert pkg.__version__ == version("altgrad-discounted-cumsum")


def test_version_is_pep440_and_not_unset():
    assert _PEP440.match(pkg.__version__), pkg.__version__


def test_tests_run_against_the_installed_package():
    # The nox sessions install the built wheel; importing from the source tree would hide packaging bugs.
    assert "site-packages" in pkg.__file__, pkg.__file__
