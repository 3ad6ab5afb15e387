"""Sin-cos table layout and pos-embed interpolation, against formulas written out here."""

import math

import pytest
import torch

from models.pos_embed import interpolate_pos_embed, sincos_2d_pos_embed


def _expected_table(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE layout: token t = row*W + col; dims [sin(col w) | cos(col w) | sin(row w) | cos(row w)], w_k = 1e4^(-k/(D/4))."""
    q = dim // 4
    out = torch.zeros(grid_h * grid_w, dim, dtype=torch.float64)
    for row in range(grid_h):
        for col in range(grid_w):
            t = row * grid_w + col
            for k in range(q):
                omega = 10000.0 ** (-k / q)
                out[t, k] = math.sin(col * omega)
                out[t, q + k] = math.cos(col * omega)
                out[t, 2 * q + k] = math.sin(row * omega)
                out[t, 3 * q + k] = math.cos(row * omega)
    return out


def test_sincos_hand_values():
    # D = 8: omega = [1, 0.01]; token 1 is (row 0, col 1)
    table = sincos_2d_pos_embed(8, 2)
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0.0, 0.0, 1.0, 1.0]
    assert table.shape == (4, 8)
    assert table.dtype == torch.float32
    torch.testing.assert_close(table[1], torch.tensor(expected, dtype=torch.float32))
    # token 2 is (row 1, col 0): the row half moves, the column half is at position 0
    expected = [0.0, 0.0, 1.0, 1.0, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(table[2], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("dim,grid", [(16, (3, 5)), (32, (4, 4)), (12, (2, 3))])
def test_sincos_matches_formula(dim, grid):
    table = sincos_2d_pos_embed(dim, grid)
    torch.testing.assert_close(table, _expected_table(dim, *grid).float(), atol=1e-6, rtol=0)


def test_sincos_cls_row_is_zero_and_square_int_grid():
    with_cls = sincos_2d_pos_embed(16, 4, cls_token=True)
    assert with_cls.shape == (17, 16)
    assert torch.count_nonzero(with_cls[0]) == 0
    torch.testing.assert_close(with_cls[1:], sincos_2d_pos_embed(16, (4, 4)))


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(18, 4)


def _keys_cubic(x: float, a: float = -0.75) -> float:
    """Keys cubic convolution kernel with PyTorch's a = -0.75."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _bicubic_1d(values: list[float], out_size: int) -> list[float]:
    """align_corners=False: src = (dst + 0.5) * in/out - 0.5, taps clamped to the border (no clamp of src)."""
    n = len(values)
    out = []
    for dst in range(out_size):
        src = (dst + 0.5) * n / out_size - 0.5
        i0 = math.floor(src)
        t = src - i0
        acc = 0.0
        for offset, dist in zip((-1, 0, 1, 2), (t + 1, t, 1 - t, 2 - t)):
            acc += _keys_cubic(dist) * values[min(max(i0 + offset, 0), n - 1)]
        out.append(acc)
    return out


def test_interpolate_orientation_and_values():
    # 2x2 grid, D = 2: channel 0 depends on the column only, channel 1 on the row only.
    cls = torch.tensor([[[7.0, -7.0]]])
    grid = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 10.0], [1.0, 10.0]])  # tokens (r0c0, r0c1, r1c0, r1c1)
    pos = torch.cat([cls, grid[None]], dim=1)  # (1, 5, 2)
    out = interpolate_pos_embed(pos, (3, 4))  # 3 rows, 4 columns
    assert out.shape == (1, 1 + 12, 2)
    torch.testing.assert_close(out[0, 0], cls[0, 0])  # prefix token untouched
    cols = _bicubic_1d([0.0, 1.0], 4)
    rows = _bicubic_1d([0.0, 10.0], 3)
    expected = torch.tensor([[cols[c], rows[r]] for r in range(3) for c in range(4)])
    torch.testing.assert_close(out[0, 1:], expected, atol=1e-5, rtol=0)


def test_interpolate_same_grid_is_identity_and_constants_stay():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    const = torch.full((1, 1 + 4, 3), 2.5)
    torch.testing.assert_close(interpolate_pos_embed(const, (5, 5)), torch.full((1, 26, 3), 2.5))


def test_interpolate_errors():
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 6, 4), (4, 4))
    out = interpolate_pos_embed(torch.zeros(1, 1 + 6, 4), (4, 6), old_grid=(2, 3))
    assert out.shape == (1, 25, 4)
    with pytest.raises(ValueError, match="shape"):
        interpolate_pos_embed(torch.zeros(5, 4), (2, 2))
