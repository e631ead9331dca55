"""Attention retriever: predicts the RGB feature of a 3D query from a key-value bank.

For a query 3D feature: the top-k keys by cosine similarity; query and keys are
projected to ``d_model``, values too (no bias); softmax of q·k/√d_model over
the k candidates weights the projected values; an output projection (no bias)
returns to the RGB feature size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionRetriever(nn.Module):
    def __init__(self, d_key: int, d_value: int, d_model: int = 128, top_k: int = 3):
        super().__init__()
        self.top_k = top_k
        self.d_model = d_model
        self.q_proj = nn.Linear(d_key, d_model, bias=False)
        self.k_proj = nn.Linear(d_key, d_model, bias=False)
        self.v_proj = nn.Linear(d_value, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_value, bias=False)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query N×Dk, keys N×k×Dk, values N×k×Dv (the candidates per query) -> N×Dv."""
        q = self.q_proj(query).unsqueeze(1)  # N×1×d
        k = self.k_proj(keys)  # N×k×d
        v = self.v_proj(values)
        weights = torch.softmax((q * k).sum(-1) / math.sqrt(self.d_model), dim=-1)  # N×k
        return self.out_proj((weights.unsqueeze(-1) * v).sum(dim=1))

    def forward(
        self,
        query: torch.Tensor,
        candidate_idx: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """query N×Dk; candidate_idx N×k indices into the bank ``keys`` M×Dk / ``values`` M×Dv."""
        return self.attend(query, keys[candidate_idx], values[candidate_idx])


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
