"""The public names of ``t3s_kernels`` are a contract (DESIGN.md): tests and users import them."""

import subprocess
import sys

import t3s_kernels

PUBLIC = {
    "FusedLossCausalLM",
    "LinearCrossEntropyLoss",
    "LinearTokenLogprobs",
    "TokenLogprobs",
    "UnionMaskOutput",
    "VocabParallel",
    "__version__",
    "block_diffusion_attention_mask",
    "block_diffusion_block_mask",
    "block_diffusion_mask_mod",
    "block_diffusion_union_mask",
    "linear_cross_entropy",
    "token_logprobs",
}


def test_all_is_exactly_the_public_api():
    assert set(t3s_kernels.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(t3s_kernels, name) is not None


def test_kernels_import_without_the_method_package_or_transformers():
    code = "import sys, t3s_kernels; print('t3s' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_version_is_the_package_version():
    from importlib.metadata import version

    assert version("t3s") == t3s_kernels.__version__
