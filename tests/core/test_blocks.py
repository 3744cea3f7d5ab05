"""The block split on small hand-built networks: module order, groups, the cut, its checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.backbones import Backbone
from pipeline.core.blocks import (
    Chain,
    Flatten4D,
    _group_of_modules,
    check_split,
    ordered_modules,
    resolve_blocks,
    set_bn_modes,
    split_backbone,
)
from pipeline.core.errors import ParamsError, PipelineError
from pipeline.core.preprocess import Preprocessing

PP = Preprocessing(8, 8, "bilinear", (0.5,) * 3, (0.5,) * 3)


class Net(nn.Module):
    """stem conv, two blocks (conv + BN), a parameter-free activation, pool, head conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.1)))
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.act(self.blocks(self.stem(x)))), 1)


def groups_of(model: nn.Module) -> list[list[str]]:
    names = [n for n, _ in model.named_parameters()]
    return [[n for n in names if n.startswith(prefix)]
            for prefix in ("stem.", "blocks.0.", "blocks.1.")]


def backbone(model: nn.Module | None = None, groups: list[list[str]] | None = None) -> Backbone:
    model = (model or Net()).eval()
    return Backbone("net", "hand-built", "none", PP, 4, groups or groups_of(model), model)


def test_modules_come_in_forward_order_with_block_containers_expanded_and_pools_flattened():
    names = [n for n, _ in ordered_modules(Net())]
    assert names == ["stem", "blocks.0", "blocks.1", "act", "pool", "pool:flatten"]

    class One(nn.Module):  # a one-block container and a non-container name stay whole
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Conv2d(3, 3, 1))
            self.layers = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])
            self.head = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1))
            self.max = nn.AdaptiveMaxPool2d(1)

    assert [n for n, _ in ordered_modules(One())] == ["blocks", "layers", "head", "max",
                                                      "max:flatten"]


def test_flatten_turns_pooled_maps_into_vectors_and_leaves_vectors_alone():
    assert Flatten4D()(torch.ones(2, 5, 1, 1)).shape == (2, 5)
    assert Flatten4D()(torch.ones(2, 5)).shape == (2, 5)
    chain = Chain([("a", nn.Identity()), ("b", Flatten4D())])
    assert chain.names == ["a", "b"] and chain(torch.ones(3, 2, 1, 1)).shape == (3, 2)


@pytest.mark.parametrize("blocks, cut, trainable", [
    (0, "", []),
    (1, "blocks.1", ["blocks.1.0.weight", "blocks.1.0.bias", "blocks.1.1.weight",
                     "blocks.1.1.bias"]),
    (2, "blocks.0", 8),
    ("all", "stem", 10),
    (3, "stem", 10),
])
def test_the_cut_is_at_the_first_module_of_the_trainable_groups(blocks, cut, trainable):
    b = backbone()
    split = split_backbone(b, blocks)
    assert split.cut_module == cut and split.num_groups == 3
    assert split.blocks == (3 if blocks == "all" else blocks)
    names = split.prefix.names + split.suffix.names
    assert names == [n for n, _ in ordered_modules(b.model)]
    if isinstance(trainable, list):
        assert split.trainable_names == trainable
    else:
        assert len(split.trainable_names) == trainable
    assert split.describe() == {"blocks": split.blocks, "num_block_groups": 3,
                                "cut_before": cut or "(after the backbone)",
                                "trainable_backbone_tensors": len(split.trainable_names)}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(split.suffix(split.prefix(x)), b.model(x), atol=1e-6)


def test_parameter_free_modules_belong_to_the_group_before_them():
    modules = ordered_modules(Net())
    assert _group_of_modules(modules, groups_of(Net()), "net") == [0, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("blocks, message", [
    (-1, "finetune.blocks must be 0..3 or 'all' (got -1)"),
    (True, "finetune.blocks must be 0..3 or 'all' (got True)"),
    ("some", "finetune.blocks must be 0..3 or 'all' (got 'some')"),
    (4, "finetune.blocks is 4 but net has 3 block groups; use 0..3 or 'all'"),
])
def test_a_block_count_out_of_range_names_the_range(blocks, message):
    with pytest.raises(ParamsError) as error:
        resolve_blocks(blocks, 3, "net")
    assert str(error.value) == message
    assert resolve_blocks(3, 3, "net") == 3 and resolve_blocks(0, 3, "net") == 0
    assert resolve_blocks("all", 3, "net") == 3


def test_groups_that_do_not_follow_the_modules_are_refused():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    missing = [g for g in groups_of(net)][:2]  # blocks.1's parameters in no group
    with pytest.raises(PipelineError, match="module blocks.1 has parameters outside"):
        split_backbone(backbone(net, missing), 1)
    spanning = [[n for n in names if n.startswith("stem.")],
                [n for n in names if n.startswith("blocks.0.0")],
                [n for n in names if n.startswith(("blocks.0.1", "blocks.1"))]]
    with pytest.raises(PipelineError, match=r"module blocks.0 spans block groups \[1, 2\]"):
        split_backbone(backbone(net, spanning), 1)
    reordered = [groups_of(net)[i] for i in (1, 0, 2)]
    with pytest.raises(PipelineError, match="not in forward order at blocks.0"):
        split_backbone(backbone(net, reordered), 1)
    # with no trainable block the groups are never consulted
    assert split_backbone(backbone(net, reordered), 0).cut_module == ""


def test_a_forward_that_is_no_chain_is_refused_and_the_modes_are_restored():
    from pipeline.core.blocks import GroupFeatures

    class Skip(Net):  # the stem's output is added back after the blocks: not a chain
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.stem(x)
            return torch.flatten(self.pool(self.act(self.blocks(s) + s)), 1)

    b = backbone(Skip())
    b.model.blocks[0].train()
    with pytest.raises(PipelineError, match=r"forward is not a chain .*max diff"):
        split_backbone(b, 1)
    assert b.model.blocks[0].training and not b.model.stem.training

    class Wider(Net):  # the forward's output has another shape than the chain's
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([super().forward(x)] * 2, 1)

    with pytest.raises(PipelineError, match=r"got shape \(2, 4\), expected \(2, 8\)"):
        split_backbone(backbone(Wider()), 1)
    with pytest.raises(PipelineError, match=r"forward is not a chain"):
        GroupFeatures(backbone(Skip()))  # its layers would not be the network's
    unchecked = split_backbone(backbone(Skip()), 1, check=False)
    with pytest.raises(PipelineError):
        check_split(backbone(Skip()), unchecked)


def test_a_small_relative_difference_on_large_outputs_passes():
    class Scaled(Net):  # outputs near 1e4: the tolerance scales with them
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 1e4 + 1e4

    b = backbone(Scaled())
    split = split_backbone(b, 0, check=False)
    split.suffix = Chain([("big", _Times(1e4, 1e4 + 0.5))])
    check_split(b, split)  # off by 0.5 on ~1e4: within 1e-4 x scale
    split.suffix = Chain([("big", _Times(1e4, 1e4 + 5.0))])
    with pytest.raises(PipelineError, match="max diff 5"):
        check_split(b, split)


class _Times(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_of_the_suffix_follows_train_bn_and_the_prefix_stays_in_eval(train_bn):
    split = split_backbone(backbone(), 1)
    split.prefix.train()
    set_bn_modes(split, train_bn)
    assert not any(m.training for m in split.prefix.modules())
    bns = [m for m in split.suffix.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [m for m in split.suffix.modules() if not isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training is train_bn for m in bns)
    assert all(m.training for m in others)  # dropout trains


# --------------------------------------------------------------------------- backbone.layer


def test_an_earlier_layer_ends_the_network_there_and_pools_it():
    from pipeline.core.blocks import truncate_backbone

    full = backbone()
    assert truncate_backbone(full, "last") is full and "layer" not in full.describe()
    b = truncate_backbone(backbone(), 1)
    assert b.layer == 1 and b.describe()["layer"] == 1 and b.feature_dim == 4
    assert isinstance(b.model.blocks[1], nn.Identity) and not isinstance(b.model.blocks[0],
                                                                         nn.Identity)
    assert [len(g) for g in b.block_groups] == [2, 4]  # stem, blocks.0: names unchanged
    assert sorted(n for g in b.block_groups for n in g) == sorted(
        n for n, _ in b.model.named_parameters())
    ref = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = torch.flatten(ref.pool(ref.act(ref.blocks[0](ref.stem(x)))), 1)
        assert torch.allclose(b.model(x), expected, atol=1e-6)
    # fine-tuning the last group of the cut network trains blocks.0
    assert split_backbone(b, 1).cut_module == "blocks.0"
    stem_only = truncate_backbone(backbone(), 0)
    assert [len(g) for g in stem_only.block_groups] == [2] and stem_only.feature_dim == 4


def test_a_layer_read_from_params_is_compared_by_value():
    """YAML strings are not the code's interned literals: "last" from params.yaml is last."""
    from pipeline.core.blocks import resolve_layer

    assert resolve_layer("".join(["la", "st"]), 3, "net") is None


def test_one_forward_gives_every_layer_as_its_cut_network_would():
    from pipeline.core.blocks import GroupFeatures, truncate_backbone

    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        outputs = GroupFeatures(backbone()).eval()(x)
        expected = [truncate_backbone(backbone(), k).model(x) for k in (0, 1)]
        expected.append(backbone().model(x))
    assert len(outputs) == 3
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[1][:, :4])


@pytest.mark.parametrize("layer", [3, -1, True, "first"])
def test_a_layer_out_of_range_names_the_key_and_the_range(layer):
    from pipeline.core.blocks import truncate_backbone

    with pytest.raises(ParamsError) as error:
        truncate_backbone(backbone(), layer)
    assert str(error.value) == (f"backbone.layer must be 0..2 (the block groups of net) or "
                                f"'last' (got {layer!r})")


def test_a_network_without_global_pooling_cannot_give_earlier_features():
    from pipeline.core.blocks import truncate_backbone

    class NoPool(Net):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.blocks(self.stem(x)))

    with pytest.raises(PipelineError, match="no global pooling layer"):
        truncate_backbone(backbone(NoPool()), 1)


def test_shape_checks_hold_both_ways_and_only_pooled_maps_are_flattened():
    class Narrower(Net):  # the forward's output has fewer columns than the chain's
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:, :2]

    with pytest.raises(PipelineError, match=r"got shape \(2, 4\), expected \(2, 2\)"):
        split_backbone(backbone(Narrower()), 1)
    assert Flatten4D()(torch.ones(2, 5, 3)).shape == (2, 5, 3)


def test_a_cut_that_breaks_the_forward_is_a_one_line_error():
    from pipeline.core.blocks import truncate_backbone

    class Widening(Net):  # blocks.1 doubles the channels and the stem is added back after it
        def __init__(self) -> None:
            super().__init__()
            self.blocks[1] = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.stem(x)
            return torch.flatten(self.pool(self.blocks(s) + s.repeat(1, 2, 1, 1)), 1)

    with pytest.raises(PipelineError, match=r"^hand-built: cut after block group 1, its "
                       r"forward .*use backbone.layer: last$"):
        truncate_backbone(backbone(Widening()), 1)
