"""Crossmodal mappers (GeGLU / MLP) with the cyclic loss, and the attention retriever."""

from cfr_core.models.mappers import MLP, CrossModalMappers, GeGLU, cosine_loss
from cfr_core.models.retriever import AttentionRetriever

__all__ = ["MLP", "AttentionRetriever", "CrossModalMappers", "GeGLU", "cosine_loss"]
