"""XFPEmbedding against the reference decoder: row-wise decoding is bit-identical to decoding the whole table
and indexing it, in both modes; ids are checked like nn.Embedding's; a tied XFPLinear reads the same tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.test_kernels_v2a import random_v2a
from runtime.test_linear import random_packed
from xfp.config import SUPPORTED_BITS
from xfp.format.reference import decode
from xfp.runtime import XFPEmbedding, XFPLinear
from xfp.runtime.embedding import decode_rows, select_rows


def bits16(t: torch.Tensor) -> torch.Tensor:
    """float16 values as their bit patterns: `equal` on these is bit-identity (tells -0.0 from 0.0)."""
    return t.view(torch.int16)


def matrices():
    """(label, packed): V2 at every width with outliers (several per row in some rows), V2a with one library
    and with four, kept columns, ragged groups, outliers."""
    for bits in SUPPORTED_BITS:
        yield f"v2-{bits}bit", random_packed(37, 29, bits, n_outliers=60, seed=bits)
    yield "v2a-L1", random_v2a(41, 100, 3, 32, library=1, kept=0, n_outliers=30, seed=1)
    yield "v2a-L4-kept", random_v2a(41, 100, 4, 48, library=4, kept=5, n_outliers=30, seed=2)
    yield "v2a-one-row", random_v2a(1, 23, 2, 5, library=2, kept=2, n_outliers=3, seed=3)


MATRICES = dict(matrices())


def id_sets(rows: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return [
        torch.tensor([0]),
        torch.tensor([rows - 1, 0, rows - 1]),  # repeats, out of order
        torch.randint(0, rows, (3, 17), generator=g),  # [batch, seq]
        torch.arange(rows).flip(0),  # every row
        torch.zeros(2, 0, dtype=torch.long),  # empty
    ]


@pytest.mark.parametrize("label", list(MATRICES))
def test_decoded_rows_are_the_indexed_decode_bit_for_bit(label):
    packed = MATRICES[label]
    whole = decode(packed)
    for ids in id_sets(packed.rows):
        got = decode_rows(packed, ids)
        assert got.dtype == torch.float16 and got.shape == (*ids.shape, packed.cols)
        assert torch.equal(bits16(got), bits16(whole[ids])), (label, ids.shape)


@pytest.mark.parametrize("label", list(MATRICES))
def test_selected_rows_keep_their_outliers_renumbered(label):
    packed = MATRICES[label]
    rows = torch.tensor(sorted({0, packed.rows // 2, packed.rows - 1}))
    sub = select_rows(packed, rows)
    assert sub.rows == rows.numel() and sub.layout.mode == packed.layout.mode
    pos = packed.outlier_pos.long()
    expected = int(torch.isin(pos // packed.cols, rows).sum())
    assert sub.outlier_pos.numel() == expected and sub.outlier_pos.dtype == torch.int32
    assert bool((sub.outlier_pos[1:] > sub.outlier_pos[:-1]).all())  # still a valid, increasing list


def test_the_matrices_exercise_outliers_in_selected_rows():
    # guards the tests above: several matrices hold rows with more than one outlier
    counts = torch.bincount(MATRICES["v2-4bit"].outlier_pos.long() // 29)
    assert int(counts.max()) >= 3


@pytest.mark.parametrize("label", ["v2-3bit", "v2a-L4-kept"])
def test_module_lookup_is_the_decoded_table_in_the_model_dtype(label):
    packed = MATRICES[label]
    ids = torch.tensor([[3, 1, 3, 0], [2, 2, 5, 7]])
    w = decode(packed)
    emb = XFPEmbedding.from_packed(packed)  # float32, the default dtype
    y = emb(ids)
    assert y.dtype == torch.float32 and y.shape == (2, 4, packed.cols)
    torch.testing.assert_close(y, F.embedding(ids, w.float()), rtol=0, atol=0)
    assert emb.xfp_codes is packed.codes  # held, not copied
    emb.to(torch.bfloat16)  # the output follows the cast; the stored float16 parts do not
    assert emb(ids).dtype == torch.bfloat16 and torch.equal(emb(ids), w[ids].bfloat16())
    stored16 = "xfp_codebook" if packed.layout.mode == "v2" else "xfp_library"
    assert getattr(emb, stored16).dtype == torch.float16
    assert torch.equal(bits16(getattr(emb, stored16)), bits16(packed.tensors()[stored16.removeprefix("xfp_")]))


def test_scaled_lookup_multiplies_by_the_scale_rounded_to_the_dtype():
    # Gemma's scaled embedding: lookup (in the weight's dtype) * embed_scale.to(weight dtype)
    packed = MATRICES["v2-4bit"]
    ids = torch.tensor([[5, 0, 36]])
    scale = 29**0.5
    for dtype in (torch.float32, torch.bfloat16):
        emb = XFPEmbedding.from_packed(packed, dtype=dtype, scale=scale)
        expected = decode(packed)[ids].to(dtype) * torch.tensor(scale, dtype=dtype)
        assert torch.equal(emb(ids), expected)


@pytest.mark.parametrize("bad", [-1, 37, 1000])
def test_out_of_range_ids_are_refused_like_nn_embedding(bad):
    emb = XFPEmbedding.from_packed(MATRICES["v2-2bit"])
    dense = torch.nn.Embedding(37, 29)
    ids = torch.tensor([[0, bad, 2]])
    with pytest.raises(IndexError):
        dense(ids)
    with pytest.raises(IndexError, match=f"id {bad} is not in \\[0, 37\\)"):
        emb(ids)


def test_non_integer_ids_are_refused():
    emb = XFPEmbedding.from_packed(MATRICES["v2-2bit"])
    with pytest.raises(TypeError, match="int32 or int64"):
        emb(torch.tensor([[0.0, 1.0]]))
    assert emb(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 29)


def test_tied_linear_reads_the_embedding_tensors(monkeypatch):
    monkeypatch.setenv("XFP_KERNEL", "reference")  # exact: F.linear with the decoded matrix
    packed = MATRICES["v2a-L4-kept"]
    emb = XFPEmbedding.from_packed(packed)
    head = XFPLinear.tied(emb)
    assert head.is_tied and head.source is emb and not emb.is_tied
    assert dict(head.named_buffers()) == {} and head.state_dict() == {}  # no second copy
    assert (head.in_features, head.out_features) == (packed.cols, packed.rows)
    assert head.packed().codes is emb.xfp_codes
    x = torch.randn(3, packed.cols, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head(x), F.linear(x, decode(packed).float()), rtol=0, atol=0)
    # what the embedding holds is what the head reads: replace a buffer as loading does
    other = random_v2a(41, 100, 4, 48, library=4, kept=5, n_outliers=30, seed=9)
    emb._set_packed(other)
    torch.testing.assert_close(head(x), F.linear(x, decode(other).float()), rtol=0, atol=0)
    assert "tied" in repr(head)


def test_tied_embedding_reads_the_linear_tensors():
    packed = MATRICES["v2-5bit"]
    head = XFPLinear.from_packed(packed)
    emb = XFPEmbedding.tied(head)
    ids = torch.tensor([4, 36, 4])
    assert torch.equal(emb(ids), decode(packed)[ids].float())
    assert emb.state_dict() == {}


def test_tied_module_refuses_a_tied_source_or_another_layout():
    emb = XFPEmbedding.from_packed(MATRICES["v2-4bit"])
    head = XFPLinear.tied(emb)
    with pytest.raises(ValueError, match="holding its own buffers"):
        XFPEmbedding.tied(head)
    with pytest.raises(ValueError, match="this module needs"):
        XFPLinear(29, 37, 3, 60, bias=False, source=emb)


def test_meta_module_sizes_its_buffers_from_the_layout():
    emb = XFPEmbedding(1000, 64, 4, 7, mode="v2a", group=32, library=2, kept=1, device="meta", dtype=torch.bfloat16)
    shapes = {name: (b.dtype, tuple(b.shape)) for name, b in emb.named_buffers()}
    assert shapes["xfp_codes"] == (torch.uint8, (1000, 32))
    assert shapes["xfp_ids"] == (torch.uint8, (1000, 2))
    assert shapes["xfp_kept_val"] == (torch.int8, (1000, 1))
    assert emb.dtype == torch.bfloat16 and emb.num_embeddings == 1000 and emb.embedding_dim == 64
