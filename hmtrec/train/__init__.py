"""One training loop for every torch model, checkpoints and run directories."""
