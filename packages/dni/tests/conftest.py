"""Shared test settings."""

import torch

# The tests use tiny tensors: one intra-op thread avoids oversubscription on shared CI machines.
torch.set_num_threads(1)
