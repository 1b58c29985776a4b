"""fraqat-eval: targets, the evaluator, FID/KID/CLIP metrics and the comparison table."""
