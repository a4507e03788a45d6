"""Test-suite settings: every tensor here is tiny, so one intra-op thread is fastest and avoids
oversubscribing shared CI runners."""

import torch

torch.set_num_threads(1)
