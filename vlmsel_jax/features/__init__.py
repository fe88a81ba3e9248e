"""Features of a model on a dataset: batched sharded extraction, feature banks on disk, patch grids."""
