"""Hot input columns, found from the weights alone: planted extreme rows and columns in a synthetic model."""

import pytest
import torch

from xfp.quantize import hot_columns
from xfp.quantize.hot_columns import MAX_FRACTION, MIN_WRITERS, HotColumns, find

HIDDEN, INTER, LAYERS = 256, 512, 3
RATIO = 5.0  # QuantConfig.keep_columns' default
HOT = 7  # a residual dimension flagged by MIN_WRITERS writers: hot
LONE = 11  # flagged by one writer fewer: not hot
BIG = 1.0  # 50x the weights' std, about 20x the typical group absmax (0.02 * ~2.4)


def cap(cols: int) -> int:
    return max(1, int(MAX_FRACTION * cols))


def layer(i: int, kind: str) -> str:
    module = {"q": "self_attn.q_proj", "o": "self_attn.o_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}[kind]
    return f"model.layers.{i}.{module}.weight"


WRITERS = [layer(i, kind) for i in range(LAYERS) for kind in ("o", "down")]


def synthetic_model() -> dict[str, torch.Tensor]:
    """Gaussian weights (std 0.02) of a 3-layer model, with extreme weights planted:
    - residual dim HOT in the rows of the first MIN_WRITERS writers, LONE in one writer fewer;
    - row 13 of every q_proj (a reader: its rows are not residual dimensions, it casts no vote);
    - columns of layer 2's down_proj: cap + 2 of them, of distinct magnitudes (the cap must bind)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    model = {layer(i, kind): torch.randn(*shape, generator=g) * 0.02
             for i in range(LAYERS) for kind, shape in shapes.items()}
    model["model.layers.0.input_layernorm.weight"] = torch.ones(HIDDEN)
    for n, name in enumerate(WRITERS[:MIN_WRITERS]):
        model[name][HOT, 3 + n] = BIG
    for n, name in enumerate(WRITERS[:MIN_WRITERS - 1]):
        model[name][LONE, 40 + n] = -BIG
    for i in range(LAYERS):
        model[layer(i, "q")][13, 5] = BIG
    down = model[layer(2, "down")]
    for k in range(cap(INTER) + 2):
        down[100 + k, 200 + 3 * k] = BIG * (1 + k)  # column 200 + 3k, larger with k
    return model


@pytest.fixture(scope="module")
def model():
    return synthetic_model()


@pytest.fixture(scope="module")
def hot(model):
    return find(list(model), model.__getitem__, RATIO)


def test_writers_flag_a_residual_dim_only_together(model, hot):
    assert MIN_WRITERS >= 2 and len(WRITERS) > MIN_WRITERS
    assert hot.ratio == RATIO and hot.hidden == HIDDEN
    assert hot.residual == [HOT]  # not LONE (too few writers), not 13 (q_proj rows do not vote)
    # each writer's own extreme rows: planted ones only (Gaussian weights stay far below the ratio)
    assert hot_columns.extreme_rows(model[WRITERS[0]], RATIO) == [HOT, LONE]
    assert hot_columns.extreme_rows(model[layer(0, "q")], RATIO) == [13]


def test_the_vote_threshold_is_min_writers(model):
    one_more = dict(model)
    name = WRITERS[MIN_WRITERS - 1]
    one_more[name] = model[name].clone()
    one_more[name][LONE, 60] = BIG
    assert find(list(one_more), one_more.__getitem__, RATIO).residual == [HOT, LONE]


def test_writers_keep_their_own_extreme_columns(model, hot):
    assert hot.columns(WRITERS[0], model[WRITERS[0]]).tolist() == sorted([3, 40])  # HOT and LONE were planted there
    assert layer(2, "o") not in WRITERS[:MIN_WRITERS]
    assert hot.columns(layer(2, "o"), model[layer(2, "o")]).tolist() == []  # a writer with nothing extreme
    # layer 2 down_proj: cap + 2 extreme columns, the cap most extreme kept, returned ascending
    n = cap(INTER)
    picked = hot.columns(layer(2, "down"), model[layer(2, "down")])
    assert picked.dtype == torch.int64 and picked.tolist() == [200 + 3 * k for k in range(2, n + 2)]
    ranked = hot_columns.extreme_columns(model[layer(2, "down")], RATIO)
    assert ranked.tolist() == [200 + 3 * k for k in reversed(range(n + 2))]  # most extreme first


def test_readers_keep_the_residual_dims(model, hot):
    for name in (layer(0, "q"), layer(1, "up"), layer(2, "up")):
        assert model[name].shape[1] == HIDDEN
        assert hot.columns(name, model[name]).tolist() == [HOT]


def test_other_matrices_keep_nothing(model, hot):
    assert hot.columns("model.layers.0.mlp.router.weight", torch.randn(4, INTER)).numel() == 0  # cols != hidden
    norm = "model.layers.0.input_layernorm.weight"
    assert hot.columns(norm, model[norm]).numel() == 0  # not 2-D
    assert HotColumns(RATIO, HIDDEN, []).columns(layer(0, "q"), model[layer(0, "q")]).numel() == 0  # no hot dim


def test_readers_are_capped_most_extreme_first():
    n = cap(HIDDEN)
    dims = list(range(10, 10 + n + 3))
    w = torch.zeros(8, HIDDEN)
    for rank, d in enumerate(dims):
        w[0, d] = 1.0 + rank  # the last dims read the largest weights
    picked = HotColumns(RATIO, HIDDEN, dims).columns(layer(0, "q"), w)
    assert picked.tolist() == dims[-n:]
    assert HotColumns(RATIO, HIDDEN, dims).columns(layer(0, "q"), torch.zeros(8, HIDDEN)).numel() == n


def test_ratio_zero_disables(model):
    loads = []
    off = find(list(model), lambda name: loads.append(name) or model[name], 0.0)
    assert loads == [] and off.residual == [] and off.hidden is None
    for name in (WRITERS[0], layer(2, "down"), layer(0, "q")):
        assert off.columns(name, model[name]).numel() == 0
    assert HotColumns(0.0, HIDDEN, [HOT]).columns(layer(0, "q"), model[layer(0, "q")]).numel() == 0


def test_no_writers_no_hidden_size(model):
    readers = [n for n in model if n not in WRITERS]
    found = find(readers, model.__getitem__, RATIO)
    assert found.hidden is None and found.residual == []
    assert found.columns(layer(0, "q"), model[layer(0, "q")]).numel() == 0
    assert found.to_dict() == {"ratio": RATIO, "hidden": None, "residual": []}


def test_typical_absmax_is_the_median_group_peak():
    w = torch.zeros(2, 130)  # groups of 64 along each row: 64, 64 and a ragged 2
    w[0, :64], w[0, 64:128], w[0, 128:] = 1.0, 2.0, 3.0
    w[1, :64], w[1, 64:128], w[1, 128:] = -4.0, 5.0, 6.0
    assert hot_columns.typical_absmax(w) == 3.0  # median of (1, 2, 3, 4, 5, 6), the lower middle


# -- sandwich norms (Gemma 2/3): readers keep the columns of the estimated input energy ---------------------

SW_HIDDEN, SW_INTER, SW_VOCAB = 128, 256, 64
SW_EMBED_DIM = 5  # the scaled embedding puts its energy in this dimension
SW_POST_DIM = 9  # layer 0's post-attention norm writes this dimension loudly


def sandwich_model() -> dict[str, torch.Tensor]:
    """A 2-layer sandwich-norm model in the HF Gemma convention (norm weights w, gain 1 + w), Gaussian weights
    (std 0.02) with one extreme down_proj column and one extreme o_proj column planted."""
    g = torch.Generator().manual_seed(1)
    m = {"model.embed_tokens.weight": torch.randn(SW_VOCAB, SW_HIDDEN, generator=g) * 0.01}
    m["model.embed_tokens.weight"][:, SW_EMBED_DIM] = 1.0
    shapes = {"self_attn.q_proj": (SW_HIDDEN, SW_HIDDEN), "self_attn.k_proj": (SW_HIDDEN // 2, SW_HIDDEN),
              "self_attn.v_proj": (SW_HIDDEN // 2, SW_HIDDEN), "self_attn.o_proj": (SW_HIDDEN, SW_HIDDEN),
              "mlp.gate_proj": (SW_INTER, SW_HIDDEN), "mlp.up_proj": (SW_INTER, SW_HIDDEN),
              "mlp.down_proj": (SW_HIDDEN, SW_INTER)}
    for i in range(2):
        for module, shape in shapes.items():
            m[f"model.layers.{i}.{module}.weight"] = torch.randn(*shape, generator=g) * 0.02
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            m[f"model.layers.{i}.{norm}.weight"] = torch.zeros(SW_HIDDEN)
    m["model.layers.0.post_attention_layernorm.weight"][SW_POST_DIM] = 30.0  # gain 31
    m["model.layers.1.mlp.down_proj.weight"][3, 77] = BIG
    m["model.layers.1.self_attn.o_proj.weight"][4, 21] = BIG
    return m


GEMMA = {"model_type": "gemma3_text"}


def sandwich_find(m, config=GEMMA):
    names = [n for n in m if m[n].dim() == 2 and "embed" not in n]
    return find(names, m.__getitem__, RATIO, tensor_names=list(m), config=config)


def test_sandwich_energy_by_hand():
    m = sandwich_model()
    energy = hot_columns.sandwich_input_energy(list(m), m.__getitem__, GEMMA)
    assert sorted(energy) == [f"model.layers.{i}.{n}" for i in range(2)
                              for n in ("input_layernorm", "pre_feedforward_layernorm")]
    emb = m["model.embed_tokens.weight"].double()
    stream = emb.square().mean(0) * SW_HIDDEN  # Gemma scales the embedding by sqrt(hidden)
    torch.testing.assert_close(energy["model.layers.0.input_layernorm"], stream / stream.mean(), rtol=1e-12, atol=0)
    stream = stream + 1.0
    stream[SW_POST_DIM] += 31.0 ** 2 - 1.0
    torch.testing.assert_close(energy["model.layers.0.pre_feedforward_layernorm"], stream / stream.mean(),
                               rtol=1e-12, atol=0)
    stream = stream + 1.0 + 1.0  # layer 0's post-feedforward gain, layer 1's post-attention gain
    torch.testing.assert_close(energy["model.layers.1.pre_feedforward_layernorm"], stream / stream.mean(),
                               rtol=1e-12, atol=0)


def test_sandwich_readers_keep_the_loud_dims_writers_as_before():
    m = sandwich_model()
    hot = sandwich_find(m)
    assert hot.to_dict()["sandwich_readers"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        picked = hot.columns(name, m[name])
        assert picked.numel() == cap(SW_HIDDEN) and SW_EMBED_DIM in picked.tolist()
        assert picked.tolist() == sorted(picked.tolist())
    # layer 0's MLP and every later reader also see the post-norm's loud dimension
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert SW_POST_DIM in hot.columns(name, m[name]).tolist()
    assert SW_POST_DIM not in hot.columns("model.layers.0.self_attn.q_proj.weight",
                                          m["model.layers.0.self_attn.q_proj.weight"]).tolist()
    assert hot.columns("model.layers.1.mlp.down_proj.weight", m["model.layers.1.mlp.down_proj.weight"]).tolist() == [77]
    assert hot.columns("model.layers.1.self_attn.o_proj.weight", m["model.layers.1.self_attn.o_proj.weight"]).numel() == 0


def test_sandwich_rule_needs_the_norms_and_the_gain_convention():
    m = sandwich_model()
    del m["model.layers.1.pre_feedforward_layernorm.weight"]
    assert hot_columns.sandwich_input_energy(list(m), m.__getitem__, GEMMA) == {}
    assert "sandwich_readers" not in sandwich_find(m).to_dict()
    full = sandwich_model()
    # stored weights 0 mean gain 1 under Gemma's (1 + w), gain 0 elsewhere: no energy at all
    plain = hot_columns.sandwich_input_energy(list(full), full.__getitem__, {"model_type": "llama"})
    assert all(float(e.abs().max()) == 0.0 or e.isnan().all() for e in plain.values())


def test_pre_norm_models_are_unchanged(model, hot):
    again = find(list(model), model.__getitem__, RATIO, tensor_names=list(model), config={"model_type": "llama"})
    assert again.to_dict() == hot.to_dict() and again.reader_energy == {}
