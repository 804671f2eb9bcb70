"""SparK's sync-free implementation computes exactly what the reference algorithm computes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images, perturb_norms_and_biases_

from spark_core import build_spark
from spark_core.reference_impl import build_reference_spark


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_loss_prediction_and_gradients_as_the_reference(backbone: str, mode: str) -> None:
    ours = perturb_norms_and_biases_(build_spark(backbone, 64, decoder_width=128))
    ours.train(mode == "train")
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
        expected = ref_params[name].grad
        # float32 sums in another order (thread count): noise relative to the tensor's scale.
        scale = float(expected.abs().max())
        torch.testing.assert_close(param.grad, expected, rtol=1e-3, atol=1e-5 + 1e-3 * scale)
    ref_buffers = dict(reference.named_buffers())
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_computes_what_the_cpu_computes(backbone: str) -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = build_spark(backbone, 64, decoder_width=128).train()
    gpu = build_spark(backbone, 64, decoder_width=128).train().cuda()
    gpu.load_state_dict(cpu.state_dict())
    images = make_images()
    active = cpu.generate_mask(4)
    active[0] = False  # a sample with nothing visible
    out_cpu = cpu(images, active)
    out_gpu = gpu(images.cuda(), active.cuda())
    torch.testing.assert_close(out_gpu.loss.cpu(), out_cpu.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_gpu.pred.cpu(), out_cpu.pred, rtol=1e-3, atol=1e-4)
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    gpu_params = dict(gpu.named_parameters())
    for name, param in cpu.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(
                gpu_params[name].grad.cpu(), param.grad, rtol=2e-3, atol=2e-5, msg=name
            )
    gpu_buffers = dict(gpu.named_buffers())
    for name, buf in cpu.named_buffers():
        torch.testing.assert_close(gpu_buffers[name].cpu(), buf, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_step_matches_fp32_closely() -> None:
    model = build_spark("resnet18", 64, decoder_width=128).train().cuda()
    images = make_images().cuda()
    active = model.generate_mask(4, device="cuda")
    fp32 = model(images, active).loss
    fast = model.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = fast(images.contiguous(memory_format=torch.channels_last), active).loss
    torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2)
