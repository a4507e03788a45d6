"""Shared test settings."""

import torch

# The tests use tiny tensors: one intra-op thread avoids oversubscription on shared CI machines.
torch.set_num_threads(1)

import os  # noqa: E402
import sys  # noqa: E402

# The pipeline tests' spawned worker (_pipeline_worker) lives next to the tests; with --import-mode=importlib the
# folder is not on sys.path.
sys.path.insert(0, os.path.dirname(__file__))
