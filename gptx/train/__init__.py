"""Training and fine-tuning on a text file, with optional TensorBoard / W&B / MLflow reporting. Needs torch."""
