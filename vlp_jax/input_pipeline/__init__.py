"""Input pipeline: ArrayRecord shards -> grain -> host batches of pixels and token ids."""
