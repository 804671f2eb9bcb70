"""SparK's sync-free implementation computes exactly what the reference algorithm computes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images

from spark_core import build_spark
from spark_core.reference_impl import build_reference_spark


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_loss_prediction_and_gradients_as_the_reference(backbone: str, mode: str) -> None:
    ours = build_spark(backbone, 64, decoder_width=128).train(mode == "train")
    reference = build_reference_spark(backbone, 64, decoder_width=128).train(mode == "train")
    reference.load_state_dict(ours.state_dict())
    images = make_images()
    active = ours.generate_mask(4)
    active[0] = False  # a sample with nothing visible
    out, ref = ours(images, active), reference(images, active)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred, ref.pred, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        if param.grad is None:
            assert ref_params[name].grad is None
            continue
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-3, atol=1e-5)
    ref_buffers = dict(reference.named_buffers())
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-5, atol=1e-6, msg=name)
