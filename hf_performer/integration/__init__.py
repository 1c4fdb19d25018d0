"""The transformers seam: attention and mask functions, random-feature buffers, loading, redraws."""
