"""Building blocks of the models: parallel Linear layers, norms, rotary embeddings, paged attention."""
