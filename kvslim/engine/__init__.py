"""Inference engine pieces (sampling now; paged scheduler, CUDA graphs and TP serving to come)."""
