import pytest
import torch

# --- tiny Sana for the quantization-core tests (test_swap.py) ---------------------------------------------


@pytest.fixture
def tiny_sana_transformer():
    """A two-block SanaTransformer2DModel with random weights (seed 0): the real diffusers class, CPU-sized.

    Runs single-threaded while in use: on a small CPU runner, thread hand-offs for 64x64 matmuls
    cost far more than they save (tens of times slower under load).
    """
    from diffusers import SanaTransformer2DModel  # imported here: the other quant tests need torch only

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
        caption_channels=32, sample_size=16, patch_size=2,
    )
    try:
        yield model
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_sana_batch():
    """Keyword arguments for one forward pass of `tiny_sana_transformer` (batch 2, caption length 5)."""
    g = torch.Generator().manual_seed(1)
    batch, caption_len = 2, 5
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=g),  # (B, C, H, W) latents
        "encoder_hidden_states": torch.randn(batch, caption_len, 32, generator=g),  # (B, L, caption_channels)
        "timestep": torch.tensor([10, 500]),  # (B,)
        "encoder_attention_mask": torch.ones(batch, caption_len),  # (B, L)
    }
