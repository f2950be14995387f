"""slimkit's int4 x int8 kernel (kernels/int_matmul.cpp) against the textbook: the activations
rounded to int8 per 32 columns in torch, the weight dequantized, one fp32 matmul."""

import pytest
import torch

from slimkit.formats.integer import Int4Grouped, Int8WeightOnly, q4_layout, q4_nibbles
from slimkit.kernels import int_kernels, kernel_status

pytestmark = pytest.mark.skipif(int_kernels() is None, reason=f"integer kernels not built: {kernel_status()['int']}")


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each 32 columns rounded to int8 steps of max|x| / 127."""
    blocks = x.view(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(step > 0, step, 1)) * step).view_as(x)


def random_layer(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.int8, generator=g)
    weight = (u.float() - zero.float().repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1)
    return u, scale, zero, weight


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 20])
def test_q4_matmul_equals_int8_activations_times_the_dequantized_weight(group, rows):
    u, scale, zero, weight = random_layer(96, 256, group)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0.0  # an all-zero block
    y = torch.ops.slimkit.q4_matmul(x, q4_layout(u), scale, zero, group)
    expected = int8_blocks(x) @ weight.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("cols", [96, 256])  # an odd number of 32-column blocks, and an even one
@pytest.mark.parametrize("rows", [1, 5, 8, 12])
def test_q8_matmul_equals_int8_activations_times_the_dequantized_weight(rows, cols):
    g = torch.Generator().manual_seed(rows)
    weights = torch.randint(-128, 128, (72, cols), dtype=torch.int8, generator=g)
    weights[0, :] = -128  # the extreme code: |w| = 128 still fits the pair sums
    scales = torch.rand(72, generator=g) * 0.01
    x = torch.randn(rows, cols, generator=g)
    y = torch.ops.slimkit.q8_matmul(x, weights, scales)
    expected = int8_blocks(x) @ (weights.float() * scales[:, None]).T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_int8_layers_run_the_kernel_and_give_fp32_logits():
    """fp32 results (the int8 head's logits were bf16 through torch's kernel: ties among 49k)."""
    layer = Int8WeightOnly.from_dense(torch.randn(200, 96))
    assert "slimkit int8" in layer.path_for(1)
    x = torch.randn(3, 96)
    y = layer.kernel_matmul(x)
    assert y.dtype == torch.float32 and len(torch.unique(y)) == y.numel()
    exact = x @ layer.dequantize().T
    assert (y - exact).norm() < 0.01 * exact.norm()


def test_the_layout_round_trips_and_the_layer_keeps_its_codes():
    u, _, _, _ = random_layer(40, 192, 64)
    assert torch.equal(q4_nibbles(q4_layout(u)), u)
    layer = Int4Grouped.from_dense(torch.randn(48, 192), group_size=64)
    assert layer._q4 is not None and layer.packed is None  # RAM holds the kernel's layout only
    again = Int4Grouped.from_stored(layer.stored(), layer.meta, None)
    assert torch.equal(again.nibbles(), layer.nibbles()) and torch.equal(again.dequantize(), layer.dequantize())
    assert torch.equal(layer.nibbles(16, 40), layer.nibbles()[16:40])


def test_int8_activations_cost_little_against_fp32():
    torch.manual_seed(0)
    layer = Int4Grouped.from_dense(torch.randn(256, 576) * 0.05, group_size=64)
    x = torch.randn(4, 576)
    exact = x @ layer.dequantize().T
    error = (layer.kernel_matmul(x) - exact).norm() / exact.norm()
    assert 0 < error < 0.01, error


def test_a_compiled_function_calls_the_op_without_a_graph_break():
    layer = Int4Grouped.from_dense(torch.randn(64, 128), group_size=32)
    x = torch.randn(2, 128)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x) * 2)


def test_bad_shapes_are_refused_with_the_reason():
    u, scale, zero, _ = random_layer(8, 128, 64)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.slimkit.q4_matmul(torch.randn(1, 64), q4_layout(u), scale, zero, 64)
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.slimkit.q4_matmul(torch.randn(1, 128), q4_layout(u), scale[:, :1].contiguous(), zero[:, :1].contiguous(), 96)
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.slimkit.q4_matmul(torch.randn(1, 128), q4_layout(u), scale.float(), zero, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.slimkit.q8_matmul(torch.randn(1, 40), torch.zeros(4, 40, dtype=torch.int8), torch.ones(4))


def test_moving_a_layer_moves_its_kernel_layout():
    layer = Int4Grouped.from_dense(torch.randn(64, 128), group_size=32)
    moved = layer.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in moved._q4)
    assert [t.dtype for t in moved._q4] == [torch.uint8, torch.float16, torch.int8]
