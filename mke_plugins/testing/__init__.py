"""Testing aids for mke-plugins and plugin authors: the conformance kit, tiny offline models and
a stand-in for EasyEdit's registries (labelled as such) for CI where EasyEdit is absent.
"""

from __future__ import annotations

from typing import Any


def parametrize_with_checks(*args: Any, **kwargs: Any):
    from .conformance import parametrize_with_checks as _p
    return _p(*args, **kwargs)
