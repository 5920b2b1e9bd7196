"""Progressive training (PD-FGC recipe), the synthetic corpus and evaluation."""
