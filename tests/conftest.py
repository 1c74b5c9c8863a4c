"""Shared pytest set-up: tiny test models run fastest on one thread (2-thread matmuls on
[*, 64] tensors cost more in synchronisation than they gain)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
