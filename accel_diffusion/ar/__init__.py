"""A small masked-autoregressive (MAR-style) model whose tokens are sampled by a diffusion head.

``masking``: MAR's cosine masking schedule (how many tokens each AR iteration generates);
``head``: the per-token MLP diffusion head and its training loss; ``model``: the bidirectional
transformer; ``pipeline``: generation (the outer AR loop; the head's inner loop is the engine's
``denoise``); ``train``: ``accel-diffusion train shapes_mar``.
"""
