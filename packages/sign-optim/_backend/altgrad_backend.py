"""PEP 517 build backend: ``setuptools.build_meta``, except that a build from an sdist takes the sdist's version.

setuptools-scm looks for git at ``root = "../.."`` before it reads PKG-INFO, so an sdist unpacked two levels below
the top of another git repository would take its version from that repository's tags. When PKG-INFO is present
(only an sdist has one), its Version is handed to setuptools-scm as the pretend version for this distribution.
"""

import os
import re
from email.parser import HeaderParser
from pathlib import Path

from setuptools.build_meta import *  # noqa: F403

if Path("PKG-INFO").is_file():
    _meta = HeaderParser().parsestr(Path("PKG-INFO").read_text(encoding="utf-8"))
    _dist = re.sub(r"[-_.]+", "_", _meta["Name"]).upper()
    os.environ.setdefault(f"SETUPTOOLS_SCM_PRETEND_VERSION_FOR_{_dist}", _meta["Version"])
