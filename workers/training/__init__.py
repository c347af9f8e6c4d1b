"""The one training loop: its config, its epochs and the trainer."""
