"""Stochastic similarity filter (StreamDiffusion §5.3): skip frames that barely differ from the last
processed one, with a probability that grows with their cosine similarity to it.

    P(skip) = max(0, (c - threshold) / (1 - threshold)),   c = cos(frame, reference)

The reference is the last *processed* frame. ``max_skip`` caps consecutive skips: after that many
skips in a row the next frame is processed whatever its similarity. (The reference implementation
counts skips since the last *forced* frame and allows one more skip than its cap; here the count is
of consecutive skips, reset by any processed frame, and never exceeds ``max_skip``.)
"""

from __future__ import annotations

import torch


class SimilarityFilter:
    def __init__(self, threshold: float = 0.98, max_skip: int = 10, seed: int = 0) -> None:
        if not 0 <= threshold:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.max_skip = max_skip
        self._generator = torch.Generator("cpu").manual_seed(seed)
        self._reference: torch.Tensor | None = None
        self._skipped_in_a_row = 0

    def skip_probability(self, frame: torch.Tensor) -> float:
        """The probability with which ``frame`` would be skipped now (0 with no reference)."""
        if self._reference is None or self.threshold >= 1:
            return 0.0
        dtype = torch.float32 if frame.device.type == "mps" else torch.float64  # MPS has no float64
        similarity = torch.nn.functional.cosine_similarity(frame.flatten().to(dtype),
                                                           self._reference.flatten().to(dtype), dim=0).item()
        return max(0.0, (similarity - self.threshold) / (1 - self.threshold))

    def should_skip(self, frame: torch.Tensor) -> bool:
        """Decide for ``frame`` (a tensor in [-1, 1]); a processed frame becomes the reference."""
        probability = self.skip_probability(frame)
        draw = torch.rand((), generator=self._generator).item()
        if probability > 0 and draw < probability and self._skipped_in_a_row < self.max_skip:
            self._skipped_in_a_row += 1
            return True
        self._skipped_in_a_row = 0
        self._reference = frame.detach().clone()
        return False

    def reset(self) -> None:
        self._reference = None
        self._skipped_in_a_row = 0
