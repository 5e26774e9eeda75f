"""The package's expected failures.

Every error a user can fix (a bad file, option, model directory or split) derives from
``DleafError`` as well as from the builtin it specialises, so library users can catch either;
the CLI turns them (and ``OSError``, ``ValueError``) into one line and exit code 2.
"""

from __future__ import annotations


class DleafError(Exception):
    """An expected failure; the message says what to do."""
