"""Training: trie units and windows -> batches, the objective, optimizers, the training loops."""
