"""benchmarks/bf16_accuracy.py: its emulation of bf16 matrix products, and its table."""

import pytest
import torch

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def script():
    return benchmark_scripts.load("bf16_accuracy")


def test_emulated_products_are_fp32_products_of_the_bf16_operands(script):
    torch.manual_seed(0)
    a, b = torch.randn(2, 24, 40).bfloat16(), torch.randn(2, 40, 16).bfloat16()
    bias = torch.randn(16).bfloat16()
    with script.EmulatedBF16Products() as mode:
        mm, bmm = a[0] @ b[0], torch.bmm(a, b)
        addmm = torch.addmm(bias, a[0], b[0])
        fp32 = a[0].float() @ b[0].float()  # products of other dtypes are left alone
    assert mode.products == 3 and fp32.dtype == torch.float32
    assert torch.equal(mm, fp32.bfloat16()) and mm.dtype == torch.bfloat16
    assert torch.equal(bmm, torch.bmm(a.float(), b.float()).bfloat16())
    assert torch.equal(addmm, (bias.float() + fp32).bfloat16())
    # torch's own bf16 product on this CPU: the same up to one rounding step (0.4 %)
    torch.testing.assert_close(mm, a[0] @ b[0], rtol=8e-3, atol=8e-3)


def test_emulation_covers_the_backward_under_autocast(script):
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with script.EmulatedBF16Products() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert mode.products == 3  # the forward addmm, and two products in the backward
    assert layer.weight.grad.dtype == torch.float32


def test_table_gives_each_seeds_difference_and_their_mean(script):
    def result(precision, seed, overall):
        return {"precision": precision, "seed": seed, "overall": overall,
                "yes/no": 60.0, "number": 30.0, "other": 50.0}  # fmt: skip

    results = [
        *(result("fp32", 1, 55.0), result("bf16", 1, 55.5)),
        *(result("fp32", 2, 54.0), result("bf16", 2, 53.9)),
        result("fp32", 3, 50.0),
    ]
    lines = script.table(results, [1, 2, 3]).splitlines()
    assert len(lines) == 5  # header, rule, seeds 1 and 2 (3 has no bf16 run), the mean
    assert lines[2].startswith("| 1 | 55.00 | 55.50 | +0.50 |")
    assert lines[3].startswith("| 2 | 54.00 | 53.90 | -0.10 |")
    # mean of +0.5 and -0.1 = +0.2; standard error = stdev / sqrt(2) = 0.30
    assert lines[4].startswith("| mean of 2 | 54.50 | 54.70 | +0.20 ± 0.30 |")
