"""Training: the loop template, data splits, and the train-a-bundle entry point."""
