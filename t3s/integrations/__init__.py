"""Adapters that let other training stacks use t3s selections and t3s_kernels losses (Hugging Face Trainer, TRL)."""
