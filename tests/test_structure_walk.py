"""The structure walk: group kinds, masked-vs-sliced parity, and that verification catches what it must."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from anpyc.adapters.backbones import create_backbone
from anpyc.structure import parity, randomize_norms, walk
from anpyc.task import InputSpec

TIMM_MODELS = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "test_byobnet"]
ALL_MODELS = TIMM_MODELS + ["mlp", "cnn"]


def _spec(model: str) -> InputSpec:
    if model == "mlp":
        return InputSpec("vector", (48,), (0.5,), (0.3,), "bilinear", 1.0, "L")
    return InputSpec("image", (3, 32, 32), (0.5,) * 3, (0.3,) * 3, "bilinear", 1.0, "RGB")


def _build(model: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    spec = _spec(model)
    trunk = create_backbone(model, input_spec=spec).eval()
    x = torch.randn((2, *spec.shape), generator=torch.Generator().manual_seed(0))
    return trunk, x


def _random_masks(structure, n: int, seed: int = 0):
    """``n`` random unit subsets: every group keeps at least one unit and loses at least one."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        active = torch.rand(structure.num_units, generator=g) < 0.5
        for grp in structure.groups:
            sl = slice(grp.offset, grp.offset + grp.size)
            if not bool(active[sl].any()):
                active[grp.offset] = True
            if bool(active[sl].all()):
                active[grp.offset + grp.size - 1] = False
        yield active


@pytest.fixture(scope="module")
def walked():
    cache = {}

    def get(model):
        if model not in cache:
            trunk, x = _build(model)
            cache[model] = (trunk, x, walk(trunk, x, model_name=model))
        return cache[model]

    return get


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_group_is_accepted(model, walked):
    trunk, _, s = walked(model)
    assert s.groups, f"{model}: no prunable group"
    bad = [r for r in s.rejected if r.reason != "a single unit"]
    assert not bad, f"{model}: rejected {bad[:3]}"
    # every conv/linear weight of the trunk is touched by some unit (the probe head aside)
    weights = [n for n, m in trunk.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(f"{w}.weight" in s.tensor_units for w in weights), set(weights) - {t[:-7] for t in s.tensor_units}


def test_group_kinds(walked):
    kinds = {m: {g.kind for g in walked(m)[2].groups} for m in ("test_vit", "test_resnet", "mlp")}
    assert "heads" in kinds["test_vit"] and "channels" in kinds["test_vit"]
    assert kinds["test_resnet"] == {"channels"}
    assert kinds["mlp"] == {"channels"}
    vit = walked("test_vit")[2]
    heads = [g for g in vit.groups if g.kind == "heads"]
    trunk = walked("test_vit")[0]
    for g in heads:
        site = g.attention[0]
        assert g.size == trunk.get_submodule(site.module).num_heads
        assert {s.tensor.rsplit(".", 2)[-2] for s in g.slices} >= {"qkv", "proj"}
    # LayerNorm sites are registered for the residual stream (masked statistics)
    assert any(g.norms for g in vit.groups)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_parity_random_masks(model, walked):
    """Masked dense features == physically sliced features within 1e-5, on randomised norms, for random masks."""
    trunk, x, s = walked(model)
    probe = randomize_norms_copy(trunk)
    for active in _random_masks(s, 3, seed=1):
        rep = parity(probe, s, active, x)
        assert rep.error == "" and rep.max_abs_diff <= 1e-5, f"{model}: {rep}"


def randomize_norms_copy(trunk: nn.Module) -> nn.Module:
    import copy

    probe = copy.deepcopy(trunk).eval()
    randomize_norms(probe, torch.Generator().manual_seed(3))
    return probe


def test_broken_rule_is_caught(monkeypatch):
    """A slicing rule that keeps the wrong BatchNorm statistics breaks parity: the walk rejects those groups."""
    from anpyc.structure import layers

    original = layers.SLICE_RULES[nn.modules.batchnorm._BatchNorm]

    def broken(m, direction, pos):
        touches = original(m, direction, pos)
        n = m.num_features
        return [layers.TensorSlice(t.tensor, t.dim, tuple(n - 1 - p for p in t.positions))
                if t.tensor == "running_var" else t for t in touches]

    monkeypatch.setitem(layers.SLICE_RULES, nn.modules.batchnorm._BatchNorm, broken)
    trunk, x = _build("cnn")
    unverified = walk(trunk, x, verify=False)
    probe = randomize_norms_copy(trunk)
    assert not all(parity(probe, unverified, a, x).ok for a in _random_masks(unverified, 2))
    verified = walk(trunk, x)
    assert not verified.groups
    assert all("failed parity" in r.reason for r in verified.rejected)


# ================================================================================================ generality
# Small torch models with the constructs that the walk generalises over; none of them is a timm model.

class _HeadBiasAttention(nn.Module):
    """Attention with a relative-position bias table holding one column per head (as Swin's)."""

    def __init__(self, dim: int = 32, num_heads: int = 4, tokens: int = 16):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn(2 * tokens - 1, num_heads) * 0.5)
        idx = torch.arange(tokens)
        self.register_buffer("bias_index", (idx[:, None] - idx[None, :] + tokens - 1), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        attn = attn + self.bias_table[self.bias_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class _ChannelMeanNorm(nn.Module):
    """Not a known norm layer, but divides by a mean across channels (as ConvNeXt-V2's GRN)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        s = x.abs().mean(dim=1, keepdim=True)
        return x / (s + 1e-2) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _Scale(nn.Module):
    """A per-channel scale that stores its width as a static shape (as MetaFormer's layer scale)."""

    def __init__(self, c: int):
        super().__init__()
        self.shape = (c, 1, 1)
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class _Odd(nn.Module):
    """A concat that leads with a constant block (no autograd history: Torch-Pruning does not see it), a
    channel-statistics norm, a static-shape scale, and a transformer block whose attention carries per-head bias
    columns."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.side = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(36, 32, 1)
        self.norm = _ChannelMeanNorm(32)
        self.scale = _Scale(32)
        self.down = nn.Conv2d(32, 32, 2, stride=4)
        self.ln1 = nn.LayerNorm(32)
        self.attn = _HeadBiasAttention(32, 4, 4)
        self.ln2 = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.num_features = 32

    def forward(self, x):
        a = torch.relu(self.stem(x))
        const = x.new_ones(x.shape[0], 4, a.shape[2], a.shape[3])  # channels 0..3 of the concat, no producer
        y = torch.cat([const, a, torch.relu(self.side(x))], 1)
        y = self.scale(self.norm(self.mix(y)))
        t = self.down(y).flatten(2).transpose(1, 2)  # (B, 4 tokens, 32)
        t = t + self.attn(self.ln1(t))
        t = t + self.fc2(torch.relu(self.fc1(self.ln2(t))))
        return t.mean(1)


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(0)
    net = _Odd().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return net, x, walk(net, x)


def test_odd_model_fully_prunable(odd):
    net, x, s = odd
    bad = [r for r in s.rejected if r.reason != "a single unit"]
    assert not bad, bad
    names = {g.name: g for g in s.groups}
    assert {"side", "side#1", "mix", "attn.qkv"} <= set(names), sorted(names)
    # stem and side feed one concat: one traced group, split per branch so that each branch keeps a channel
    branches = {frozenset(sl.tensor for sl in names[n].slices if sl.dim == 0 and sl.tensor.endswith("weight")):
                names[n].size for n in ("side", "side#1")}
    assert branches == {frozenset({"stem.weight"}): 24, frozenset({"side.weight"}): 8}
    assert all("mix.weight" in {sl.tensor for sl in names[n].slices} for n in ("side", "side#1"))
    # the concat offsets come from the real shapes: the constant block is channels 0..3 and belongs to no unit
    mix_in = sorted(sl.positions for g in s.groups for sl in g.slices if sl.tensor == "mix.weight" and sl.dim == 1)
    assert mix_in == [tuple(range(4, 28)), tuple(range(28, 36))]


def test_per_head_tensors_follow_heads(odd):
    _, _, s = odd
    g = next(g for g in s.groups if g.kind == "heads")
    table = [sl for sl in g.slices if sl.tensor == "attn.bias_table"]
    assert table and table[0].dim == 1 and table[0].units == (0, 1, 2, 3)
    assert g.attention[0].count_attrs == ("num_heads",)


def test_channel_statistics_module_is_a_norm_site(odd):
    _, _, s = odd
    assert "norm" in s.norm_units  # found by watching its reductions, not by its type


def test_odd_model_parity(odd):
    net, x, s = odd
    probe = randomize_norms_copy(net)
    for active in _random_masks(s, 3, seed=2):
        rep = parity(probe, s, active, x)
        assert rep.ok and rep.max_abs_diff <= 1e-5, rep


def test_unmappable_op_poisons_only_its_groups(monkeypatch):
    """An index mapping that raises rejects the groups through that op; the walk itself does not fail."""
    from torch_pruning.dependency import index_mapping as im

    def boom(self, idxs):
        raise ZeroDivisionError("mapping bug")

    monkeypatch.setattr(im._ConcatIndexMapping, "__call__", boom)
    torch.manual_seed(0)
    net = _Odd().eval()
    x = torch.randn(2, 3, 16, 16)
    s = walk(net, x)
    rejected = {r.name: r.reason for r in s.rejected}
    assert "side" in rejected and "cannot map channels" in rejected["side"]
    assert "attn.qkv" in {g.name for g in s.groups}  # untouched by the concat


def test_resume_layout_rebuilds_same_units(walked):
    trunk, x, s = walked("test_vit")
    layout = [{"name": g.name, "kind": g.kind, "size": g.size} for g in s.groups]
    again = walk(trunk, x, layout=layout)
    assert again.fingerprint() == s.fingerprint()


class _SplitTwice(nn.Module):
    """One split output feeding both a conv and the residual add around it (a CSP stage in small)."""

    def __init__(self):
        super().__init__()
        self.exp = nn.Conv2d(3, 16, 1)
        self.blk = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 12, 1)
        self.num_features = 12

    def forward(self, x):
        a, b = self.exp(x).split(8, dim=1)
        b = b + self.blk(b)
        return self.out(torch.cat([a, b], 1)).mean((2, 3))


def test_split_outputs_are_matched_to_their_consumers():
    from anpyc.structure import trace_groups

    torch.manual_seed(0)
    raw = trace_groups(_SplitTwice().eval(), torch.randn(2, 3, 8, 8), 12)
    group = next(g for g in raw if any(it.target == "blk" and it.direction == "out" for it in g.items))
    assert group.problem is None
    cls = {(it.target, it.direction): dict(zip(it.positions, it.roots, strict=True)) for it in group.items}
    assert ("blk", "in") in cls, "blk reads the second split output"
    exp, blk, blk_in, out = cls[("exp", "out")], cls[("blk", "out")], cls[("blk", "in")], cls[("out", "in")]
    # channel c of the second half of exp is channel c of blk's input and output and channel 8 + c of out's input
    assert [exp[8 + c] for c in range(8)] == [blk_in[c] for c in range(8)] == [blk[c] for c in range(8)]
    assert [exp[8 + c] for c in range(8)] == [out[8 + c] for c in range(8)]
    assert [exp[c] for c in range(8)] == [out[c] for c in range(8)]
    assert sorted(exp) == list(range(16)) and len(set(exp.values())) == 16


def test_groups_that_conflict_only_together_lose_only_the_conflict(monkeypatch):
    """Two groups that pass parity alone but fail together reject one of them; the groups beside them stay."""
    import importlib

    from anpyc.structure.walk import ParityReport, verify_groups

    walk_mod = importlib.import_module("anpyc.structure.walk")  # the module (the package exports the function)

    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 6)
    s = walk(net, x, verify=False)
    names = [g.name for g in s.groups]
    assert len(names) == 5  # four hidden layers and the features
    a, b = names[0], names[-1]  # the conflicting pair sits in different halves of the bisection

    def fake(trunk, structure, active, example):
        touched = {g.name for g in structure.groups if not bool(active[g.offset: g.offset + g.size].all())}
        return ParityReport(False, 0.5) if {a, b} <= touched else ParityReport(True, 0.0)

    monkeypatch.setattr(walk_mod, "parity", fake)
    kept, bad = verify_groups(net, s, x)
    assert list(bad) == [b] and bad[b] == "fails only together with other groups (max abs diff 0.5)"
    assert sorted(set(names) - set(bad)) == sorted([n for n in names if n != b])


class _Recurrent(nn.Module):
    """An LSTM between two linear layers (as Sequencer's token mixer)."""

    def __init__(self, bidirectional: bool):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(10 if bidirectional else 5, 7)

    def forward(self, x):
        y, _ = self.rnn(self.embed(x))
        return self.head(y).mean(1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_an_lstm_loses_input_features_and_hidden_units(bidirectional):
    """An LSTM's input features are units, and so are the hidden units of a one-way LSTM (a two-way one keeps
    its hidden size: both directions must keep the same); every random subset slices to the masked features."""
    from anpyc.structure.slicing import slice_trunk

    torch.manual_seed(0)
    net = _Recurrent(bidirectional).eval()
    x = torch.randn(2, 5, 4)
    s = walk(net, x)
    sizes = {g.name: g.size for g in s.groups}
    assert sizes == ({"embed": 6, "head": 7} if bidirectional else {"embed": 6, "rnn": 5, "head": 7}), s.rejected
    for active in _random_masks(s, 3, seed=1):
        rep = parity(net, s, active, x)
        assert rep.ok and rep.max_abs_diff <= 1e-5, rep
        sliced = slice_trunk(net, s, active)
        kept = {g.name: int(active[g.offset: g.offset + g.size].sum()) for g in s.groups}
        assert sliced.rnn.input_size == kept["embed"]
        assert sliced.rnn.hidden_size == kept.get("rnn", 5)


class _PerHeadBiasMlp(nn.Module):
    """A helper inside an attention module with its own head count: an MLP emitting one bias per head (timm's
    RelPosMlp), viewed through the stored count."""

    def __init__(self, num_heads: int, tokens: int):
        super().__init__()
        self.num_heads = num_heads
        self.fc1 = nn.Linear(2, 16)
        self.fc2 = nn.Linear(16, num_heads)
        self.register_buffer("coords", torch.randn(tokens * tokens, 2), persistent=False)

    def forward(self, attn):
        bias = self.fc2(torch.relu(self.fc1(self.coords))).view(-1, self.num_heads)
        n = attn.shape[-1]
        return attn + bias.t().reshape(1, -1, n, n)


class _MlpBiasAttention(_HeadBiasAttention):
    def __init__(self, dim: int = 16, num_heads: int = 4, tokens: int = 4):
        super().__init__(dim, num_heads, tokens)
        del self.bias_table
        self.head_dim = dim // num_heads
        self.rel = _PerHeadBiasMlp(num_heads, tokens)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.rel(q @ k.transpose(-2, -1) * self.head_dim ** -0.5)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class _MlpBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.attn = _MlpBiasAttention()

    def forward(self, x):
        x = self.embed(x)
        return (x + self.attn(x)).mean(1)


def test_a_per_head_helper_module_follows_the_heads_of_its_attention():
    """The helper's own head count does not make it a second attention module: its per-head outputs are cut with
    the heads of the attention around it, and slicing updates its stored count too."""
    from anpyc.structure.slicing import slice_trunk

    torch.manual_seed(0)
    net = _MlpBiasNet().eval()
    x = torch.randn(2, 4, 3)
    s = walk(net, x)
    heads = next((g for g in s.groups if g.kind.startswith("heads")), None)
    assert heads is not None, s.rejected
    assert heads.size == 4 and [a.module for a in heads.attention] == ["attn", "attn.rel"]
    fc2 = next(sl for sl in heads.slices if sl.tensor == "attn.rel.fc2.weight")
    assert fc2.dim == 0 and fc2.units == (0, 1, 2, 3)
    for active in _random_masks(s, 3, seed=3):
        assert parity(net, s, active, x).ok
        kept = int(active[heads.offset: heads.offset + heads.size].sum())
        sliced = slice_trunk(net, s, active)
        assert sliced.attn.num_heads == sliced.attn.rel.num_heads == kept


class _HeadMajorAttention(nn.Module):
    """TinyViT's layout: the fused projection is cut into heads first (``view(b, n, heads, -1)``), then into q, k
    and v; no ``head_dim`` attribute says which layout it is."""

    def __init__(self, dim: int = 16, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = (q @ k.transpose(-2, -1) * self.key_dim ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))


class _Damped(nn.Module):
    """The attention followed by layers initialised as small as timm's (std 0.02): a wrong head layout differs by
    O(1) inside the attention and by far less than the parity tolerance at the features."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.attn = _HeadMajorAttention()
        self.tail = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)])
        for m in self.tail:
            nn.init.normal_(m.weight, std=0.02)
            nn.init.constant_(m.bias, 0.5)

    def forward(self, x):
        x = self.embed(x)
        return self.tail(x + self.attn(x)).mean(1)


def test_verification_sees_through_layers_that_shrink_a_difference():
    """The walk verifies on a copy with unit-gain weights, so the standard head layout fails on this head-major
    attention and the walk settles on ``heads-major``, which stays exact on any weights."""
    import copy

    from anpyc.structure.walk import randomize_weights

    torch.manual_seed(0)
    net = _Damped().eval()
    x = torch.randn(2, 5, 3)
    s = walk(net, x)
    heads = next(g for g in s.groups if g.name == "attn.qkv")
    assert heads.kind == "heads-major", heads.kind
    trained = randomize_weights(copy.deepcopy(net), torch.Generator().manual_seed(1))
    for active in _random_masks(s, 3, seed=4):
        rep = parity(trained, s, active, x)
        assert rep.ok and rep.max_abs_diff <= 1e-5, rep
