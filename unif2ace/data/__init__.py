"""Data: the built-in synthetic face set, its tokenizers, and the pre-tokenized shard format."""
