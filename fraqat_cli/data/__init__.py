"""What a run trains and evaluates on: captions, prompt sets, the synthetic shapes, the training
sources, and the cached conditioning of prompts."""
