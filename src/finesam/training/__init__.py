"""Fine-tuning: losses and the pieces a training loop is made of."""
