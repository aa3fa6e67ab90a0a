"""Position kinds against formulas written here, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from anydepth.nn.positional import (
    AxialPosition,
    InterleavedRotaryTable,
    LearnedPosition,
    RotaryEmbedding,
    RotaryTable,
    SinusoidalPosition,
    apply_rotary,
)
from anydepth.registry import POSITIONS

F64 = torch.float64


def build(kind, dim=8, dim_head=4, max_seq_len=16, **fields):
    return POSITIONS.build(
        POSITIONS.config(kind, **fields), dim=dim, dim_head=dim_head, max_seq_len=max_seq_len
    )


def test_registry_flags():
    assert set(POSITIONS.kinds()) >= {"none", "learned", "sinusoidal", "axial", "rotary"}
    flags = {k: (POSITIONS.get(k).absolute, POSITIONS.get(k).rotary) for k in POSITIONS.kinds()}
    assert flags["none"] == (False, False)
    assert flags["rotary"] == (False, True)
    for k in ("learned", "sinusoidal", "axial"):
        assert flags[k] == (True, False)
    assert build("none")(torch.arange(3)) is None


def test_learned_is_a_table_lookup():
    pos = build("learned", dim=6, max_seq_len=5)
    p = torch.tensor([4, 0, 2, 2])
    torch.testing.assert_close(pos(p), torch.stack([pos.weight[i] for i in p.tolist()]), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [5, 17])
def test_learned_beyond_max_seq_len_is_a_value_error(bad):
    pos = build("learned", dim=6, max_seq_len=5)
    with pytest.raises(ValueError, match=rf"position {bad} .*max_seq_len=5"):
        pos(torch.arange(bad + 1))


def test_positions_must_be_nonnegative_1d_integers():
    pos = build("learned")
    with pytest.raises(ValueError, match=">= 0"):
        pos(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="1-D integer"):
        pos(torch.arange(4.0))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        pos(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        pos([0, 1])


def test_sinusoidal_formula():
    dim, base = 10, 10000.0
    pos = SinusoidalPosition.make(dim=dim, base=base).double()
    p = torch.tensor([0, 1, 7, 1000])
    out = pos(p)
    assert out.dtype == F64
    for r, pp in enumerate(p.tolist()):
        for i in range(dim // 2):
            w = base ** (-2 * i / dim)
            assert out[r, i].item() == pytest.approx(math.sin(pp * w), abs=1e-12)
            assert out[r, dim // 2 + i].item() == pytest.approx(math.cos(pp * w), abs=1e-12)


def test_sinusoidal_returns_the_module_dtype_and_needs_even_dim():
    assert SinusoidalPosition(dim=8)(torch.arange(3)).dtype == torch.get_default_dtype()
    assert SinusoidalPosition(dim=8).to(torch.bfloat16)(torch.arange(3)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even dim.*dim=7"):
        SinusoidalPosition(dim=7)


def test_axial_sum_formula():
    pos = AxialPosition.make(dim=6, shape=(3, 4), combine="sum").double()
    e1, e2 = pos.weights
    out = pos(torch.arange(12))
    for p in range(12):
        torch.testing.assert_close(out[p], e1[p // 4] + e2[p % 4], rtol=0, atol=0)


def test_axial_concat_formula_three_axes():
    pos = AxialPosition.make(dim=7, shape=(2, 3, 2), dims=(2, 4, 1), combine="concat").double()
    e1, e2, e3 = pos.weights
    out = pos(torch.arange(12))
    for p in range(12):
        i1, i2, i3 = p // 6, (p // 2) % 3, p % 2
        torch.testing.assert_close(out[p], torch.cat((e1[i1], e2[i2], e3[i3])), rtol=0, atol=0)
    # default split of dim over the axes
    assert AxialPosition.make(dim=7, shape=(4, 4), combine="concat").dims == (4, 3)


def test_axial_from_config_default_shape_covers_max_seq_len():
    for L in (1, 10, 64, 100, 1000):
        pos = build("axial", dim=4, max_seq_len=L)
        assert math.prod(pos.shape) >= L
        assert pos(torch.arange(L)).shape == (L, 4)


def test_axial_errors():
    with pytest.raises(ValueError, match=r"shape=\(4, 4\) covers 16 .*max_seq_len=17"):
        build("axial", max_seq_len=17, shape=(4, 4))
    with pytest.raises(ValueError, match=r"summing to dim=8, got dims=\(3, 3\)"):
        build("axial", dim=8, shape=(4, 4), dims=(3, 3), combine="concat")
    with pytest.raises(ValueError, match="combine='sum'.*dims"):
        build("axial", dim=8, shape=(4, 4), dims=(4, 4), combine="sum")
    with pytest.raises(ValueError, match="'sum' or 'concat'"):
        build("axial", combine="mean")
    pos = build("axial", dim=4, max_seq_len=16, shape=(4, 5))
    with pytest.raises(ValueError, match=r"position 20 .*prod\(shape=\(4, 5\)\)=20"):
        pos(torch.arange(21))


def _half_split_by_complex_numbers(t, positions, rot_dim, base):
    """Half-split rotary as complex multiplication: z_i = x_i + i x_{i+r/2}, z_i * exp(i p w_i)."""
    half = rot_dim // 2
    w = base ** (-torch.arange(half, dtype=F64) * 2 / rot_dim)
    z = torch.complex(t[..., :half], t[..., half:rot_dim])
    z = z * torch.polar(torch.ones_like(w), positions.to(F64)[:, None] * w)
    return torch.cat((z.real, z.imag, t[..., rot_dim:]), dim=-1)


def _gptj_by_loops(t, positions, rot_dim, base):
    """GPT-J (reformer-pytorch) rotary written pair by pair: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    out = t.clone()
    for r, p in enumerate(positions.tolist()):
        for i in range(rot_dim // 2):
            theta = p * base ** (-2 * i / rot_dim)
            c, s = math.cos(theta), math.sin(theta)
            x1, x2 = t[..., r, 2 * i], t[..., r, 2 * i + 1]
            out[..., r, 2 * i] = x1 * c - x2 * s
            out[..., r, 2 * i + 1] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotary_half_split_matches_complex_formula(fraction):
    torch.manual_seed(0)
    rot = RotaryEmbedding.make(dim_head=8, fraction=fraction, base=100.0).double()
    p = torch.tensor([0, 3, 11])
    table = rot(p)
    assert isinstance(table, RotaryTable) and not table.interleaved
    t = torch.randn(2, 3, 3, 8, dtype=F64)
    expected = _half_split_by_complex_numbers(t, p, rot.rot_dim, 100.0)
    torch.testing.assert_close(apply_rotary(t, *table), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(table.apply(t), expected, rtol=0, atol=1e-12)
    assert rot.rot_dim == int(8 * fraction)


@pytest.mark.parametrize("fraction", [1.0, 0.75])
def test_rotary_interleaved_matches_gptj_formula(fraction):
    torch.manual_seed(1)
    rot = build("rotary", dim_head=8, fraction=fraction, interleaved=True, base=10000.0).double()
    p = torch.tensor([0, 1, 5, 40])
    table = rot(p)
    assert isinstance(table, InterleavedRotaryTable) and table.interleaved
    cos, sin = table  # unpacks as a plain (cos, sin) pair
    t = torch.randn(2, 4, 8, dtype=F64)
    expected = _gptj_by_loops(t, p, rot.rot_dim, 10000.0)
    torch.testing.assert_close(apply_rotary(t, cos, sin, interleaved=True), expected, rtol=0, atol=1e-12)
    assert rot.rot_dim == 6 if fraction == 0.75 else 8


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_scores_depend_only_on_relative_position(interleaved):
    torch.manual_seed(2)
    rot = RotaryEmbedding.make(dim_head=6, interleaved=interleaved).double()
    q, k = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)

    def score(pq, pk):
        tq, tk = rot(torch.tensor([pq])), rot(torch.tensor([pk]))
        return (tq.apply(q[None]) * tk.apply(k[None])).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)


def test_rotary_errors():
    with pytest.raises(ValueError, match="fraction"):
        build("rotary", fraction=0.0)
    with pytest.raises(ValueError, match="at least one pair"):
        build("rotary", dim_head=4, fraction=0.25)
    with pytest.raises(ValueError, match="base"):
        build("rotary", base=1.0)
    cos, sin = RotaryEmbedding(dim_head=4)(torch.arange(3))
    with pytest.raises(ValueError, match="cover 3 positions but the input has 5"):
        apply_rotary(torch.randn(5, 4), cos, sin)
    with pytest.raises(ValueError, match="width 4 do not fit features of width 2"):
        apply_rotary(torch.randn(3, 2), cos, sin)


def test_rotary_angles_stay_float32_in_half_precision():
    rot = RotaryEmbedding(dim_head=8).to(torch.bfloat16)
    cos, _ = rot(torch.tensor([30000]))
    ref = RotaryEmbedding(dim_head=8).double()(torch.tensor([30000]))[0]
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref, rtol=0, atol=1e-2)


def test_learned_init_and_config_round_trip():
    from anydepth.registry import config_from_dict, config_to_dict

    cfg = POSITIONS.config("axial", shape=(4, 4), dims=(3, 5), combine="concat")
    d = config_to_dict(cfg)
    assert d == {"kind": "axial", "shape": [4, 4], "dims": [3, 5], "combine": "concat", "init_std": 0.02}
    back = config_from_dict(d, POSITIONS)
    assert config_to_dict(back) == d
    built = POSITIONS.build(back, dim=8, dim_head=4, max_seq_len=16)  # JSON lists work as shapes
    assert built.shape == (4, 4) and built.dims == (3, 5)
    torch.manual_seed(3)
    pos = LearnedPosition.make(dim=64, max_seq_len=512, init_std=0.05)
    assert pos.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_interleaved_rotary_and_sinusoids_match_reformer_pytorch():
    rp = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    torch.manual_seed(4)
    n, d = 9, 8
    qk = torch.randn(2, n, d)
    theirs_table = rp.FixedPositionalEmbedding(d)(qk)  # (1, n, d): [sin | cos], base 10000
    ours = RotaryEmbedding.make(dim_head=d, interleaved=True)(torch.arange(n))
    torch.testing.assert_close(
        apply_rotary(qk, *ours, interleaved=True), rp.apply_rotary_pos_emb(qk, theirs_table)
    )
    torch.testing.assert_close(SinusoidalPosition(dim=d)(torch.arange(n)), theirs_table[0])
