"""VLM training: batch building, the train step, checkpoints, the loop and evaluation."""
