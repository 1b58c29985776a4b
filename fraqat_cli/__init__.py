"""fraqat: quantization-aware training with fractional bits for diffusion transformers."""

__version__ = "0.1.0"
