from .idx import read_idx
from .registry import DATASETS, Dataset, Split, batches, load_dataset

__all__ = ["read_idx", "DATASETS", "Dataset", "Split", "batches", "load_dataset"]
