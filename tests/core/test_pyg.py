"""PyTorch Geometric's graph layers, whose weights live in ``torch_geometric.nn.Linear`` (not an ``nn.Linear``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import GCNConv, SAGEConv  # noqa: E402
from torch_geometric.nn.models import GCN  # noqa: E402

from lightning_compress import compact, load_compressed, prune_, save_compressed, sparsity  # noqa: E402
from lightning_compress.core.qat import QuantConfig, calibrate, convert_to_qat, enable_fake_quant  # noqa: E402
from lightning_compress.core.structure import build_channel_groups  # noqa: E402


def _graph(nodes: int = 60, features: int = 16, edges: int = 240) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(nodes, features, generator=g), torch.randint(0, nodes, (2, edges), generator=g)


class _Net(nn.Module):
    """A Linear, a graph convolution, a classifier."""

    def __init__(self, conv: nn.Module, width: int = 24) -> None:
        super().__init__()
        self.pre, self.conv, self.head = nn.Linear(16, width), conv, nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.pre(x)), edge_index)))


def test_the_weights_of_pyg_convolutions_are_selected_by_default():
    """Trial FD: GCNConv's `lin` (a torch_geometric.nn.Linear) was left out, and said to be a parameter a module
    multiplies in its own forward; `sparsity` read 0.9 with 12% of the weights zero; PyG's own GCN was refused."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": GCNConv(64, 32), "head": nn.Linear(32, 10)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out to warn about
        prune_(model, 0.9)
    weights = [model["conv"].lin.weight, model["head"].weight]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.9, abs=1e-3) and sparsity(model) == pytest.approx(zero)
    assert float((model["conv"].lin.weight == 0).float().mean()) > 0.8
    gcn = GCN(16, 32, 2, out_channels=4)
    prune_(gcn, 0.5)
    assert all(float((conv.lin.weight == 0).float().mean()) > 0.3 for conv in gcn.convs)


def test_pyg_linears_are_quantized_and_the_file_reloads_into_a_fresh_model(tmp_path):
    """Trial FD: `convert_to_qat` converted only the classifier, without a word, and naming `conv.lin` was refused as
    if it were not a Linear."""

    def net() -> _Net:
        torch.manual_seed(0)
        return _Net(GCNConv(24, 12))

    x, edges = _graph()
    model = net().eval()
    float_out = model(x, edges)
    convert_to_qat(model, QuantConfig(8, 8))
    assert type(model.conv.lin).__name__ == "QATLinear"
    assert torch.equal(model(x, edges), float_out)  # the same computation until fake quantization is on
    calibrate(model, [(x, edges)])
    enable_fake_quant(model)
    expected = model(x, edges)
    save_compressed(model, tmp_path / "gcn.lcz")
    fresh = net().eval()
    load_compressed(fresh, tmp_path / "gcn.lcz")
    assert torch.equal(fresh(x, edges), expected)


def test_a_lazy_pyg_linear_is_quantized_after_its_first_forward():
    layer = pyg.nn.Linear(-1, 8)
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"a lazy module has not created yet \('0.weight'"):
        convert_to_qat(model, QuantConfig(8, 8))
    assert model[0] is layer
    layer(torch.randn(2, 5))  # sized now
    convert_to_qat(model, QuantConfig(8, 8))
    assert type(model[0]).__name__ == "QATLinear" and model[0].weight.shape == (8, 5)


def test_the_layer_feeding_a_graph_convolution_loses_channels_with_the_convolutions_inputs():
    """Trial FD: the tracer did not see PyG's Linear as a layer, so `pre`'s channels were left whole and blamed on
    the convolution's bias (32 entries, against `pre`'s 24 channels). SAGEConv's two Linears (neighbours and root)
    share their output channels."""
    x, edges = _graph()
    for conv in (GCNConv(24, 12), SAGEConv(24, 12)):
        torch.manual_seed(0)
        model = _Net(conv).eval()
        prune_(model, 0.5, granularity="channel", example_inputs=(x, edges))
        with torch.no_grad():
            before = model(x, edges)
            report = compact(model, (x, edges))
            assert torch.allclose(model(x, edges), before, atol=1e-5)
        assert report.channels["pre"] == (24, 12)
        assert model.pre.out_features == 12
        lins = [m for m in model.conv.modules() if isinstance(m, pyg.nn.Linear)]
        assert all(lin.weight.shape[1] == 12 and lin.in_channels == 12 for lin in lins)
        if isinstance(conv, SAGEConv):  # no bias outside its Linears: its outputs are a group too
            assert report.channels["conv.lin_l"] == (12, 6) and model.head.in_features == 6
        assert report.macs_after < report.macs_before


def test_a_full_graph_fit_prunes_and_quantizes_the_graph_layers(tmp_path):
    """One batch per epoch (the whole graph), as PyG's node classification runs in Lightning."""
    import lightning.pytorch as pl

    from lightning_compress import IterativePruning, QuantizationAwareTraining
    from tests.conftest import trainer

    x, edges = _graph()
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    class Nodes(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = _Net(SAGEConv(24, 12))

        def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
            return self.net(x, edge_index)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(x, edges), y)

        def train_dataloader(self):
            return [0]

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    pl.seed_everything(0, verbose=False)
    module = Nodes()
    pruning = IterativePruning(0.9, start_epoch=0, end_epoch=20)
    qat = QuantizationAwareTraining(8, 8, start_epoch=10)
    trainer(max_epochs=30, callbacks=[pruning, qat]).fit(module)
    names = [t.name for t in pruning.pruner.targets]
    assert names == ["net.pre", "net.conv.lin_l", "net.conv.lin_r", "net.head"]
    assert pruning.pruner.masked_sparsity() == pytest.approx(0.9, abs=2e-3)
    assert float((module.net.conv.lin_l.weight == 0).float().mean()) > 0.5
    assert type(module.net.conv.lin_l).__name__ == "QATLinear"
    module.eval()
    save_compressed(module, tmp_path / "nodes.lcz")
    fresh = Nodes().eval()
    load_compressed(fresh, tmp_path / "nodes.lcz")
    assert torch.equal(fresh(x, edges), module(x, edges))


def test_a_graph_model_exports_with_a_static_edge_dimension_and_runs_on_another_graph(tmp_path):
    """Trial FD: dimension 0 of every input was the batch, `edge_index`'s (always 2) too, and the edge count was fixed
    at the example's: another graph failed in onnxruntime. `None` makes a dimension static."""
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from lightning_compress import export_onnx

    torch.manual_seed(0)
    model = _Net(SAGEConv(24, 12)).eval()
    axes = {"input_0": {0: "nodes"}, "input_1": {0: None, 1: "edges"}, "output_0": {0: "nodes"}}
    with warnings.catch_warnings():  # dimension 0 is not a batch here: no batch check, no note that it failed (FG)
        warnings.filterwarnings("error", message=".*dynamic batch")
        export_onnx(model, tmp_path / "g.onnx", _graph(), dynamic_axes=axes)
    shape = onnx.load(str(tmp_path / "g.onnx")).graph.input[1].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in shape] == [2, "edges"]
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    x, edges = _graph(nodes=90, edges=500)
    got = session.run(None, {"input_0": x.numpy(), "input_1": edges.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), model(x, edges), atol=1e-5)


def test_the_packages_own_forwards_leave_no_cache_behind(tmp_path):
    """Trial FE: `GCNConv(cached=True)` keeps the normalized edges of the first graph it sees; the channel trace,
    `compact()` and `export_onnx` ran it on the 50-node example, and every later forward on the full graph used the
    example's edges (a fit's validation accuracy 0.13 instead of 0.98), unsaid."""
    from lightning_compress import export_onnx

    x, edges = _graph(nodes=60, edges=300)
    small = edges[:, (edges < 20).all(0)]

    def net() -> _Net:
        torch.manual_seed(0)
        return _Net(GCNConv(24, 12, cached=True)).eval()

    for run in (
        lambda m: prune_(m, 0.5, granularity="channel", example_inputs=(x[:20], small)),
        lambda m: compact(m, (x[:20], small)),
        lambda m: export_onnx(m, tmp_path / "g.onnx", (x[:20], small)),
    ):
        model = net()
        run(model)
        assert model.conv._cached_edge_index is None
        reference = net()
        reference.load_state_dict(model.state_dict())
        assert torch.equal(model(x, edges), reference(x, edges))  # the full graph's own edges


def test_a_graph_convolution_whose_bias_is_added_after_its_linear_is_left_whole_with_the_reason():
    x, edges = _graph()
    torch.manual_seed(0)
    groups, skipped = build_channel_groups(_Net(GCNConv(24, 12)), (x, edges))
    assert "conv.lin" not in {g.name for g in groups}
    assert skipped["conv.lin"].startswith("conv.bias (a parameter outside Linear/Conv/BatchNorm: a norm's weight, a")
    assert "a bias added after the layer, as PyTorch Geometric's GCNConv's" in skipped["conv.lin"]


class _Signed(_Net):
    """Messages of both signs: no ReLU before the convolution."""

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.pre(x), edge_index))


def test_a_graph_exported_with_its_node_and_edge_axes_is_still_checked_and_max_aggregation_is_said(tmp_path):
    """Trial GF: renaming dimension 0 (the documented axes for a graph) turned the check against the model off, and a
    max aggregation's graph, 1.36 off its model, was written unsaid: PyTorch Geometric's `scatter` starts max and min
    from zero while torch exports (max(0, .) of each node's messages)."""
    pytest.importorskip("onnxruntime")
    from lightning_compress import export_onnx

    torch.manual_seed(0)
    model = _Signed(SAGEConv(24, 12, aggr="max")).eval()  # messages of both signs
    axes = {"input_0": {0: "nodes"}, "input_1": {0: None, 1: "edges"}, "output_0": {0: "nodes"}}
    with pytest.warns(UserWarning) as caught:
        export_onnx(model, tmp_path / "g.onnx", _graph(), dynamic_axes=axes)
    said = [str(w.message) for w in caught]
    assert any("['conv.aggr_module'] aggregate by max or min through PyTorch Geometric's `scatter`" in m for m in said)
    assert any("the graph's outputs on the example differ from the model's" in m for m in said)
    mean = _Signed(SAGEConv(24, 12)).eval()  # mean aggregation exports exactly: nothing said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(mean, tmp_path / "m.onnx", _graph(), dynamic_axes=axes)
    assert not [w for w in caught if "export_onnx" in str(w.message)]


def test_a_pyg_batch_as_the_example_is_refused_for_onnx_with_its_tensors_named():
    """Trial GF: a `Batch` example was refused by the callbacks' `.onnx` `export_path` with "`example_inputs` must be a
    Tensor, a tuple ... got DataBatch", naming an argument the user never passed and no way out."""
    from torch_geometric.data import Batch, Data

    from lightning_compress import export_onnx

    x, edges = _graph()
    batch = Batch.from_data_list([Data(x=x, edge_index=edges)])
    with pytest.raises(ValueError, match=r"holds \['DataBatch'\]: objects holding tensors.*`\(data\.x, data\.edge_in"):
        export_onnx(_Net(SAGEConv(24, 12)).eval(), "never.onnx", batch)
