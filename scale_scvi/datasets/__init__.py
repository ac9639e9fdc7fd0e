"""The tutorials' datasets: a local copy, or the prepared file fetched and checksummed."""

from ._loaders import DATASETS, cell_lines, fetch, forebrain, scicar_kidney

__all__ = ["DATASETS", "cell_lines", "fetch", "forebrain", "scicar_kidney"]
