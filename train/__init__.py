"""The training program: `python -m train fit|evaluate ...` (AlexNet transfer learning, AMP, DDP)."""
