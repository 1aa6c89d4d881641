import os

import pytest
import torch

from locosnn.data.registry import FASHION_DIR

torch.set_num_threads(int(os.environ.get("LOCOSNN_TEST_THREADS", "1")))

has_fashion = (FASHION_DIR / "train-labels-idx1-ubyte.gz").exists()
requires_fashion = pytest.mark.skipif(not has_fashion, reason="dataset-fashion-mnist not installed (make setup)")
