"""The real-LM testbed: the real-weights LLaVA (SmolLM2-135M-Instruct + DINOv2-small, :mod:`..bench.realweights`)
with a projector trained on the world's questions, and the method measured on it (docs/results.md)."""
