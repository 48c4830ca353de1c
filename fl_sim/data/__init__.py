"""Datasets for fl-sim: plain-data types, one normalisation, sources and partitioners.

``load_data(name, **params)`` loads a registered data source into :class:`DataSplits`;
``partition_dataset(data, name, num_clients, seed=...)`` splits its train set over clients.
"""

from __future__ import annotations

from fl_sim.data.partition import partition_dataset
from fl_sim.data.sources import load_data
from fl_sim.data.transforms import Normalization, resize, to_float01, to_uint8
from fl_sim.data.types import DataSplits, ImageData

__all__ = ["DataSplits", "ImageData", "Normalization", "load_data", "partition_dataset",
           "resize", "to_float01", "to_uint8"]
