"""The eval stage: concept-learning evaluation of checkpoints (tag detector + nearest-centroid probe)."""
