"""Plain records as pandas DataFrames: the one place that imports pandas (an optional extra).

Kept apart from :mod:`fl_sim.api` so that :class:`fl_sim.run_dir.Run` can offer DataFrames
without importing the API module (which imports run_dir: no import circle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fl_sim.errors import MissingDependencyError


def to_dataframe(records: Sequence[Mapping[str, Any]]) -> Any:
    """``records`` as a pandas DataFrame; nested values (dicts, lists) stay as objects.

    Raises :class:`~fl_sim.errors.MissingDependencyError` when pandas is not installed.
    """
    try:
        import pandas as pd  # lazy: keeps pandas out of this module's import
    except ImportError:
        raise MissingDependencyError(
            "pandas is not installed: DataFrames need the optional extra "
            "(pip install 'fl-sim[pandas]'); the plain records (.metrics(), .attacks(), "
            ".records()) need nothing") from None
    return pd.DataFrame.from_records([dict(r) for r in records])
