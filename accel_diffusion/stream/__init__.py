"""StreamDiffusion runtime: stream batch, RCFG and the stochastic similarity filter, per session."""

from accel_diffusion.stream.session import StreamSession, strength_t_index_list
from accel_diffusion.stream.similarity_filter import SimilarityFilter

__all__ = ["SimilarityFilter", "StreamSession", "strength_t_index_list"]
