"""modeling_mcad.optimization: which precision `auto` picks."""

import pytest
import torch

from modeling_mcad import optimization
from modeling_mcad.errors import UserError


@pytest.mark.parametrize("amx", [True, False])
def test_auto_takes_bf16_on_a_cpu_only_with_amx(amx, monkeypatch):
    """AVX-512 BF16 without AMX runs bf16 autocast slower than float32: auto must keep float32 there."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AVX-512 BF16 either way
    assert optimization.mixed_precision_dtype("auto", "cpu") == (torch.bfloat16 if amx else None)
    assert optimization.mixed_precision_dtype("bf16", "cpu") == torch.bfloat16  # asked for: given, AMX or not
    assert optimization.mixed_precision_dtype("no", "cpu") is None


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(UserError, match=r"mixed precision 'fp8' is not one of"):
        optimization.mixed_precision_dtype("fp8", "cpu")
