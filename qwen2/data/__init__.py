"""Data: reading documents, tokenizing and packing them into token shards for training."""
