import copy
import dataclasses
import itertools
import warnings

import pytest
import torch
from torch import nn

from lightning_compress import (
    CompressedFileError,
    QuantConfig,
    calibrate,
    compact,
    convert_to_qat,
    enable_fake_quant,
    load_compressed,
    prune_,
    save_compressed,
)
from lightning_compress.core.qat import qat_modules, quantizers
from tests.export.helpers import CrossedTie, Net, compressed_net, inputs


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(8, 8, "minmax"),
        QuantConfig(8, 8, "power_of_two"),
        QuantConfig(4, 8, "learned"),
        QuantConfig(2, None, "minmax"),
        QuantConfig(3, 5, "minmax"),
        QuantConfig(8, 8, "minmax", quantize_bias=True),
        QuantConfig(8, 8, "power_of_two", quantize_bias=True),
        None,
    ],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_round_trip_reproduces_the_outputs(tmp_path, config, sparsity):
    model = compressed_net(sparsity, config)
    report = save_compressed(model, tmp_path / "m.lcz")
    fresh = Net()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert [n for n, _ in qat_modules(fresh)] == [n for n, _ in qat_modules(model)]
    x = inputs()
    assert torch.allclose(outputs(fresh, x), outputs(model, x), atol=1e-6, rtol=0)
    assert set(fresh.state_dict()) == set(model.state_dict())
    assert not list(tmp_path.glob("*.tmp"))
    if sparsity and config is not None:
        assert report.sparsity >= sparsity - 0.01  # codes that round to 0 add zeros
        assert {layer.bits for layer in report.layers} == {config.weight_bits}


@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_biases_on_their_grid_are_stored_as_int32_codes_and_reload_bit_for_bit(tmp_path, scale):
    from tests.export import forge

    model = compressed_net(0.9, QuantConfig(8, 8, scale, quantize_bias=True))
    save_compressed(model, tmp_path / "b.lcz")
    manifest, _ = forge.read(tmp_path / "b.lcz")
    kinds = {r["name"]: r["kind"] for r in manifest["tensors"]}
    assert manifest["version"] == 5 and all(kinds[f"{n}.bias"] == "bias" for n in ("conv", "fc1", "fc2"))
    assert all(manifest["qat_layers"][n]["quantize_bias"] is True for n in ("conv", "fc1", "fc2"))
    fresh = Net()
    load_compressed(fresh, tmp_path / "b.lcz")
    x = inputs()
    assert torch.equal(outputs(fresh, x), outputs(model, x))  # bit for bit
    assert torch.equal(fresh.fc1.bias, model.fc1.quantized_bias())  # the file holds the bias the layer adds
    plain = compressed_net(0.9, QuantConfig(8, 8, scale))  # the same model, biases in float
    save_compressed(plain, tmp_path / "f.lcz")
    assert (tmp_path / "b.lcz").stat().st_size < (tmp_path / "f.lcz").stat().st_size


def test_file_is_really_smaller_and_the_report_says_so(tmp_path):
    model = compressed_net(0.9, QuantConfig(8, 8))
    report = save_compressed(model, tmp_path / "m.lcz")
    assert report.file_bytes == (tmp_path / "m.lcz").stat().st_size
    assert report.compression_ratio > 10
    as_dict = report.to_dict()
    assert as_dict["compression_ratio"] == report.compression_ratio
    assert {layer["name"] for layer in as_dict["layers"]} == {"conv.weight", "fc1.weight", "fc2.weight"}
    text = str(report)
    assert "fc1.weight" in text and "x smaller" in text
    assert "total of the rows above" in text  # read "compressed weights" (trial AU: taken for every selected weight)
    dense = str(save_compressed(Net(), tmp_path / "dense.lcz"))  # trial DB: "total of the rows above 0.0% 0 B 0 B"
    assert "total of the rows above" not in dense and "(no weight is stored sparse or quantized)" in dense
    larger = dataclasses.replace(report, file_bytes=int(report.baseline_bytes * 1.1))  # e.g. a float ONNX file
    assert str(larger).endswith(": 1.10x its size")  # it read "0.9x smaller" (a trial)
    fc1 = next(layer for layer in report.layers if layer.name == "fc1.weight")
    assert fc1.index_coding == "gaps" and fc1.bytes_after < fc1.bytes_before / 15


def test_index_coding_follows_density(tmp_path):
    model = compressed_net(0.5, QuantConfig(8, 8))
    report = save_compressed(model, tmp_path / "m.lcz")
    codings = {layer.name: layer.index_coding for layer in report.layers}
    assert codings["fc1.weight"] == "bitmask"  # half the codes are zero: a bitmask beats storing them all
    assert set(codings.values()) <= {"bitmask", "dense"}


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0x10
    elif how == "magic":
        data[:4] = b"PK\x03\x04"
    elif how == "version":
        data[4] = 99
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("truncate", "truncated"),
        ("flip", "checksum mismatch"),
        ("magic", "not a lightning-compress file"),
        ("version", "format version 99"),
        ("empty", "not a lightning-compress file"),
    ],
)
def test_damaged_files_raise_and_leave_the_model_untouched(tmp_path, how, match):
    save_compressed(compressed_net(), tmp_path / "m.lcz")
    corrupt(tmp_path / "m.lcz", how)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(fresh, tmp_path / "m.lcz")
    assert not qat_modules(fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_file_for_another_architecture(tmp_path):
    save_compressed(compressed_net(), tmp_path / "m.lcz")

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = torch.nn.Linear(64, 12)

    other = Wider()
    with pytest.raises(
        CompressedFileError,
        match=r"another architecture .* shape differs: \['fc2.bias', 'fc2.weight', 'fc2.weight_fake_quant.scale'\]",
    ):
        load_compressed(other, tmp_path / "m.lcz")
    assert not qat_modules(other)
    with pytest.raises(CompressedFileError, match="missing in the file"):
        load_compressed(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "m.lcz")


def test_a_forged_file_with_a_valid_checksum_is_still_checked(tmp_path):
    # a consistent header and checksum around a payload that is not a model: refused cleanly
    from lightning_compress.export.container import write_container

    write_container(tmp_path / "f.lcz", {}, b"")
    with pytest.raises(CompressedFileError, match="unknown manifest format"):
        load_compressed(Net(), tmp_path / "f.lcz")


def test_loading_into_a_model_in_eval_mode_does_not_observe(tmp_path):
    """Regression: the quantizers that loading adds must follow the model's mode, or the first
    eval-mode call updates their ranges and the outputs drift from the saved model's."""
    from lightning_compress import QuantConfig, convert_to_qat
    from lightning_compress.core.qat import quantizers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    convert_to_qat(model, QuantConfig(8, 8))
    for _, q in quantizers(model):
        q.fake_quant_enabled = True
    model.train()
    model(torch.randn(64, 8))  # observe
    model.eval()
    x = torch.randn(16, 8) * 3  # wider than what was observed: observing would change the ranges
    expected = model(x)
    save_compressed(model, tmp_path / "m.lcz")
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert all(not q.training for _, q in quantizers(fresh))
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=0)


def test_a_bf16_model_with_learned_scales_reloads_exactly(tmp_path):
    """Regression: LSQ inverted a bf16 scale in bf16, the file in float32, so some codes were one step apart and
    the reloaded model was another model (max |diff| 0.59 after a bf16-true fit)."""
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    fresh = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).to(torch.bfloat16)
    convert_to_qat(model, QuantConfig(4, None, "learned"))
    x = torch.randn(32, 256)
    calibrate(model, [x])
    enable_fake_quant(model)
    with torch.no_grad():  # scales whose bf16 inverse is not their float32 inverse
        for _, layer in qat_modules(model):
            layer.weight_fake_quant.scale.mul_(1.37)
    model.to(torch.bfloat16)  # as under precision="bf16-true": the scales become bf16 too
    x = x.to(torch.bfloat16)
    model.eval()
    save_compressed(model, tmp_path / "m.lcz")
    load_compressed(fresh, tmp_path / "m.lcz")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_an_untied_models_file_is_refused_by_a_model_that_ties_the_two_tensors(tmp_path):
    """Trial CC: Qwen2 saved with `tie_word_embeddings=False` loaded into a tied one without a word: both tensors were
    written into the shared one, the embedding lost (logits 1.14 off). The other way round loads."""

    class LM(nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
            if tied:
                self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    torch.manual_seed(0)
    save_compressed(LM(tied=False), tmp_path / "untied.lcz")
    tied = LM(tied=True)
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(CompressedFileError, match=r"holds 'emb.weight' and 'head.weight' as two different tensors"):
        load_compressed(tied, tmp_path / "untied.lcz")
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())
    save_compressed(tied, tmp_path / "tied.lcz")
    untied = LM(tied=False)
    load_compressed(untied, tmp_path / "tied.lcz")
    assert torch.equal(untied.head.weight, tied.emb.weight) and torch.equal(untied.emb.weight, tied.emb.weight)
    load_compressed(LM(tied=True), tmp_path / "tied.lcz")


class _TiedLM(nn.Module):
    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 32), nn.Linear(32, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.emb(ids)))


@pytest.mark.parametrize("named", [["head"], ["emb"], ["emb", "head"]])
def test_a_tied_head_and_embedding_store_their_codes_once_and_reload_exactly(tmp_path, named):
    """A tied output head opted in by name was fake-quantized where the head reads the weight, not where the
    embedding does: the file stored the weight once, as codes, and the reloaded embedding read quantized values (a
    new-user trial: OPT, BART, T5, ALBERT); then it was stored in float, with a warning. Now naming either converts
    both with one weight quantizer: the file stores the codes once (the head's weight an alias of the embedding's),
    and a fresh float model reloads with the tie and the shared quantizer, computing the same outputs."""
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant
    from tests.export import forge

    def quantized() -> _TiedLM:
        torch.manual_seed(0)
        model = _TiedLM(vocab=256)
        convert_to_qat(model, QuantConfig(8, 8), include=named)
        return model

    model, ids = quantized(), torch.randint(0, 256, (4, 8))
    calibrate(model, [ids])
    enable_fake_quant(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is stored in float for a tie
        report = save_compressed(model, tmp_path / "m.lcz")
    manifest, _ = forge.read(tmp_path / "m.lcz")
    kinds = {r["name"]: (r["kind"], r.get("of")) for r in manifest["tensors"]}
    assert kinds["emb.weight"] == ("quantized", None) and kinds["head.weight"] == ("alias", "emb.weight")
    assert kinds["head.weight_fake_quant.scale"] == ("alias", "emb.weight_fake_quant.scale")
    assert report.file_bytes < 256 * 32 * 4 / 3  # int8 codes once (float: 32 KiB)
    fresh = _TiedLM(vocab=256)
    load_compressed(fresh, tmp_path / "m.lcz")
    assert fresh.head.weight is fresh.emb.weight
    assert fresh.head.weight_fake_quant is fresh.emb.weight_fake_quant
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model.eval()(ids))


def test_a_file_whose_tied_head_was_left_float_loads_as_it_was_written(tmp_path):
    """Before tied layers shared a quantizer, quantizing an embedding left its tied head float, and the file recorded
    the embedding alone: loading it converts the embedding, not the head (converted with it now), so the model is the
    one the file was written from."""
    from lightning_compress import calibrate, enable_fake_quant
    from lightning_compress.core.qat import QATEmbedding

    torch.manual_seed(0)
    model = _TiedLM()
    model.emb = QATEmbedding.from_float(model.emb, QuantConfig(8, 8))  # as the conversion of an earlier version
    ids = torch.randint(0, 64, (4, 8))
    calibrate(model, [ids])
    enable_fake_quant(model)
    with pytest.warns(UserWarning, match=r"\['emb'\] are quantized, but their weights are also used in float by"):
        save_compressed(model, tmp_path / "m.lcz")
    fresh = _TiedLM()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert (
        isinstance(fresh.emb, QATEmbedding) and type(fresh.head) is nn.Linear and fresh.head.weight is fresh.emb.weight
    )
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model.eval()(ids))


def test_a_quantized_layer_whose_weight_is_also_read_in_float_is_stored_in_float(tmp_path):
    """A tied layer that cannot share the quantizer (its weight stored the other way round: transformers' Conv1D)
    stays float, so the weight is stored in float, with a warning, and the reloaded model gives the same outputs
    (the codes would change what the float layer reads)."""
    pytest.importorskip("transformers")
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant

    def quantized() -> CrossedTie:
        torch.manual_seed(0)
        model = CrossedTie()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'b' stays float: said by the conversion
            convert_to_qat(model, QuantConfig(8, 8))
        return model

    model, x = quantized(), torch.randn(4, 8)
    calibrate(model, [x])
    enable_fake_quant(model)
    with pytest.warns(UserWarning, match=r"\['a'\] are quantized, but their weights are also used in float by \['b'\]"):
        save_compressed(model, tmp_path / "m.lcz")
    fresh = quantized()
    with torch.no_grad():
        fresh.a.weight.normal_()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert torch.equal(fresh.a.weight, model.a.weight)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


class _ReadsAWeightDirectly(nn.Module):
    """As transformers' Mamba does with ``conv1d`` and ``dt_proj``: a layer whose weight the forward reads itself."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.direct = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x) + nn.functional.linear(x, self.direct.weight, self.direct.bias)


def test_a_quantized_layer_whose_forward_never_runs_is_stored_in_float(tmp_path):
    """Its quantizer never observed (scale 1.0): the file stored all-zero codes and reloaded another model."""
    from lightning_compress import calibrate, convert_to_qat, enable_fake_quant

    torch.manual_seed(0)
    model = _ReadsAWeightDirectly()
    convert_to_qat(model, QuantConfig(8, 8))
    x = torch.randn(4, 8)
    calibrate(model, [x])
    enable_fake_quant(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match=r"\['direct'\] are fake-quant layers whose forward never ran") as said:
        save_compressed(model, tmp_path / "m.lcz")
    assert said[0].filename == __file__  # the caller's line (trial BP: pointed into the package)
    fresh = _ReadsAWeightDirectly()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert torch.equal(fresh.direct.weight, model.direct.weight)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


class Holder(nn.Module):
    """What a LightningModule holding a network looks like."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


def test_a_model_compacted_inside_another_is_saved_as_compacted(tmp_path):
    """compact(holder.net) marked only holder.net: save_compressed(holder) wrote an uncompacted file, which a fresh
    holder then refused as "another architecture" (found by a new-user trial)."""
    from lightning_compress import compact, prune_

    x = torch.randn(8, 16)
    holder = Holder().eval()
    prune_(holder.net, 0.5, granularity="channel", example_inputs=x)
    compact(holder.net, x)
    assert holder.net[0].out_features == 16
    save_compressed(holder, tmp_path / "h.lcz")
    fresh = Holder()
    load_compressed(fresh, tmp_path / "h.lcz")
    assert fresh.net[0].out_features == 16 and torch.equal(outputs(fresh, x), outputs(holder, x))


def test_the_inner_network_of_a_compacted_model_is_saved_as_compacted(tmp_path):
    """The other way round: compact(holder) marked only holder, so save_compressed(holder.net) wrote an uncompacted
    file that a fresh network refused as "another architecture" (a trial). Every module of a compacted model, and of
    a model a compacted file loaded into, is marked."""
    from lightning_compress import compact, prune_

    x = torch.randn(8, 16)
    holder = Holder().eval()
    prune_(holder, 0.5, granularity="channel", example_inputs=x)
    compact(holder, x)
    save_compressed(holder.net, tmp_path / "net.lcz")
    fresh = Holder().net
    load_compressed(fresh, tmp_path / "net.lcz")
    assert fresh[0].out_features == 16 and torch.equal(outputs(fresh, x), outputs(holder.net, x))
    again = Holder()
    load_compressed(again.net, tmp_path / "net.lcz")
    save_compressed(again, tmp_path / "again.lcz")  # loaded into the inner network, saved from the holder
    last = Holder()
    load_compressed(last, tmp_path / "again.lcz")
    assert torch.equal(outputs(last, x), outputs(holder, x))


def test_a_model_that_is_one_quantized_layer_with_a_quantized_bias_round_trips(tmp_path):
    """Its bias record named the layer "" and the reader refused the file it had just written (found by fuzzing)."""
    from lightning_compress.core.qat import QATLinear, calibrate, enable_fake_quant

    config = QuantConfig(8, 8, quantize_bias=True)
    torch.manual_seed(0)
    model = QATLinear.from_float(nn.Linear(8, 4), config)
    calibrate(model, [torch.randn(16, 8)])
    enable_fake_quant(model)
    save_compressed(model.eval(), tmp_path / "one.lcz")
    fresh = QATLinear.from_float(nn.Linear(8, 4), config)
    load_compressed(fresh, tmp_path / "one.lcz")
    x = torch.randn(3, 8)
    assert torch.equal(outputs(fresh, x), outputs(model, x))


def test_paths_and_models_that_cannot_be_saved_are_refused_before_anything_is_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="is a directory; name a file in it"):
        save_compressed(model, tmp_path)
    with pytest.raises(ValueError, match=r"its directory .* does not exist"):
        save_compressed(model, tmp_path / "missing" / "m.lcz")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        save_compressed(model, tmp_path / "file" / "m.lcz")
    with pytest.raises(TypeError, match=r"`path` must be a file path"):
        save_compressed(model, 3)
    with pytest.raises(ValueError, match=r"`path` is an empty path: name a file"):  # a trial: "got str ('')"
        save_compressed(model, "")
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        save_compressed(None, tmp_path / "m.lcz")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="`model` has tensors on the meta device"):
        save_compressed(meta, tmp_path / "m.lcz")

    # (state a module keeps outside tensors is left out, said: test_state_entries_that_are_not_tensors_are_left_out...)
    sparse = nn.Linear(4, 2)
    sparse.register_buffer("table", torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match=r"entry 'table' is a torch\.sparse_coo tensor; register it dense"):
        save_compressed(sparse, tmp_path / "m.lcz")  # a RuntimeError about data pointers before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_file_from_a_bfloat16_model_names_the_conversion_a_float32_model_needs(tmp_path):
    """A file written from a `bf16-true` fit, loaded into a fresh float32 model, was refused as 'another
    architecture' (found by a new-user trial)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(torch.bfloat16)
    save_compressed(model, tmp_path / "m.lcz")
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(CompressedFileError, match=r"holds torch\.bfloat16 tensors where Sequential has torch\.float32"):
        load_compressed(fresh, tmp_path / "m.lcz")
    load_compressed(fresh.to(torch.bfloat16), tmp_path / "m.lcz")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_a_model_converted_with_other_settings_is_refused_and_one_converted_alike_loads(tmp_path):
    """An 8-bit file loaded into a model the user had converted at 4 bits took the file's scales and computed on
    4 bits, silently (a trial). The settings of a layer converted already must be the file's."""
    saved = compressed_net(0.9, QuantConfig(8, 8))
    save_compressed(saved, tmp_path / "q8.lcz")
    other = Net()
    convert_to_qat(other, QuantConfig(4, 8))
    before = copy.deepcopy(other.state_dict())
    match = r"written from another quantization: the model's fake-quant layer 'conv' quantizes with \{'weight_bits': 4"
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(other, tmp_path / "q8.lcz")
    assert other.conv.weight_fake_quant.bits == 4
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    alike = Net()
    convert_to_qat(alike, QuantConfig(8, 8))
    load_compressed(alike, tmp_path / "q8.lcz")
    x = inputs()
    assert torch.equal(alike.eval()(x), saved(x))


class TwoNames(nn.Module):
    """Layers reachable under two names (a common way to expose a part): the Linear `self.first` is also
    `self.model[0]`, the block `self.backbone` also `self.model[1]`."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.model = nn.Sequential(self.first, self.backbone, nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class OneName(nn.Module):
    """The same layers, each under one name."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.first(x)))


def test_a_layer_registered_under_two_names_stays_one_layer_through_qat_the_file_and_back(tmp_path):
    """convert_to_qat swapped the layer under its first name only: the second path computed in float, silently.
    The file then stored the weight twice, in float (a 'tied weights' warning), and could not be reloaded (a
    trial). Now the layer is converted under both names, stored once, and reloads equal."""
    from lightning_compress import calibrate, convert_to_float, enable_fake_quant, prune_

    def compressed(model: nn.Module) -> nn.Module:
        torch.manual_seed(1)
        prune_(model, 0.8)
        convert_to_qat(model, QuantConfig(8, 8))
        calibrate(model, [torch.randn(32, 16)])
        enable_fake_quant(model)
        return model.eval()

    torch.manual_seed(0)
    model = compressed(TwoNames())
    assert [n for n, _ in qat_modules(model)] == ["first", "backbone.0", "model.2"]
    assert model.first is model.model[0] and model.backbone[0] is model.model[1][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stored in float (tied weights)"
        report = save_compressed(model, tmp_path / "two.lcz")
    fresh = TwoNames()
    load_compressed(fresh, tmp_path / "two.lcz")
    x = torch.randn(8, 16)
    assert torch.equal(fresh.eval()(x), model(x)) and fresh.first is fresh.model[0]
    torch.manual_seed(0)
    once = save_compressed(compressed(OneName()), tmp_path / "one.lcz")
    assert report.file_bytes - once.file_bytes < 200  # aliases for the second name (a float copy: +2 KiB)
    convert_to_float(model)
    assert type(model.first) is nn.Linear and model.first is model.model[0]


def test_the_report_counts_zeros_of_a_layer_stored_densely(tmp_path):
    # a trial: 9.8% zeros, stored as dense codes (cheaper than positions), were reported as 0.0% sparse
    from lightning_compress import calibrate, enable_fake_quant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.1] = 0
    zeros = float((model[0].weight == 0).float().mean())
    convert_to_qat(model, QuantConfig(8, 8))
    calibrate(model, [torch.randn(16, 32)])
    enable_fake_quant(model)
    report = save_compressed(model, tmp_path / "m.lcz")
    layer = next(r for r in report.layers if r.name == "0.weight")
    assert layer.index_coding == "dense"
    assert layer.sparsity == pytest.approx(zeros, abs=0.01)


def test_a_model_wrapped_by_fabric_saves_and_loads_as_the_plain_model(tmp_path):
    """A trial: `save_compressed(fabric.setup_module(model))` took names from the wrapper's modules
    (`_forward_module.fc1`) and from its state dict (`fc1`): the QAT weights were stored in float (131 KB against 40 KB)
    and the file loaded into neither a plain nor a wrapped model."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = compressed_net(0.5, config=QuantConfig(8, 8))
    plain_report = save_compressed(model, tmp_path / "plain.lcz")
    wrapped_report = save_compressed(fabric.setup_module(model), tmp_path / "wrapped.lcz")
    assert (tmp_path / "plain.lcz").read_bytes() == (tmp_path / "wrapped.lcz").read_bytes()
    assert wrapped_report.file_bytes == plain_report.file_bytes
    expected = model.eval()(inputs())
    for path in ("plain.lcz", "wrapped.lcz"):
        fresh = Net()
        load_compressed(fresh, tmp_path / path)
        torch.testing.assert_close(fresh.eval()(inputs()), expected, atol=0, rtol=0)
        wrapped = fabric.setup_module(Net())
        load_compressed(wrapped, tmp_path / path)
        torch.testing.assert_close(wrapped.module.eval()(inputs()), expected, atol=0, rtol=0)


def test_a_compiled_model_saves_loads_and_prunes_as_the_plain_model(tmp_path):
    """Trial BK: `save_compressed(torch.compile(model))` and `IterativePruner` keyed everything `_orig_mod.`, so the
    file loaded into no fresh instance of the class and the pruner's state resumed only into a compiled model."""
    from lightning_compress import IterativePruner

    model = compressed_net(0.5, config=QuantConfig(8, 8))
    save_compressed(model, tmp_path / "plain.lcz")
    save_compressed(torch.compile(model), tmp_path / "compiled.lcz")
    assert (tmp_path / "plain.lcz").read_bytes() == (tmp_path / "compiled.lcz").read_bytes()
    fresh = Net()
    load_compressed(torch.compile(fresh), tmp_path / "compiled.lcz")  # into a compiled model too
    torch.testing.assert_close(fresh.eval()(inputs()), model.eval()(inputs()), atol=0, rtol=0)
    torch.manual_seed(0)
    net = Net()
    pruner = IterativePruner(torch.compile(net), 0.5, total_steps=1, importance="magnitude")
    pruner.step()
    assert pruner.masks and not any(name.startswith("_orig_mod.") for name in pruner.masks)
    again = IterativePruner(Net(), 0.5, total_steps=1, importance="magnitude")
    again.load_state_dict(pruner.state_dict())  # a compiled run's state resumes into the plain model
    assert again.masks.keys() == pruner.masks.keys()


def test_a_model_with_a_compiled_submodule_saves_and_loads_under_the_plain_names(tmp_path):
    """Trial BM: a compiled submodule's weights were saved as `fc2._orig_mod.weight`: the file loaded only into a
    model compiled alike. The wrappers are put back after saving and loading (a layer the file quantizes, converted
    while loading, keeps its fake-quant layer)."""
    model = compressed_net(0.5, config=QuantConfig(8, 8))
    save_compressed(model, tmp_path / "plain.lcz")
    name, layer = next(iter(qat_modules(model)))
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, child, torch.compile(layer))
    save_compressed(model, tmp_path / "compiled.lcz")
    assert type(getattr(holder, child)).__name__ == "OptimizedModule"  # put back
    assert (tmp_path / "plain.lcz").read_bytes() == (tmp_path / "compiled.lcz").read_bytes()
    setattr(holder, child, layer)
    expected = model.eval()(inputs())
    fresh = Net()
    load_compressed(fresh, tmp_path / "compiled.lcz")
    torch.testing.assert_close(fresh.eval()(inputs()), expected, atol=0, rtol=0)
    compiled = Net()
    inner = compiled.get_submodule(parent) if parent else compiled
    setattr(inner, child, torch.compile(getattr(inner, child)))
    load_compressed(compiled, tmp_path / "plain.lcz")  # the compiled layer became a fake-quant layer
    assert type(getattr(inner, child)).__name__ != "OptimizedModule"
    torch.testing.assert_close(compiled.eval()(inputs()), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("sparsity", "config"), [(0.0, QuantConfig(4, 8)), (0.9, QuantConfig(8, 8)), (0.5, QuantConfig(8, 8)), (0.9, None)]
)
def test_load_compressed_reports_the_layers_save_compressed_reported(tmp_path, sparsity, config):
    """A trial: for the same file the load report gave 0.0% sparsity and 4096 nonzero for a densely coded layer with
    7.3% zero codes, and left the scales out of `bytes_after` (66 against 98 bytes)."""
    saved = save_compressed(compressed_net(sparsity, config=config), tmp_path / "m.lcz")
    loaded = load_compressed(Net(), tmp_path / "m.lcz")
    assert loaded.layers == saved.layers and loaded.sparsity == saved.sparsity


def test_a_model_with_very_long_parameter_names_round_trips(tmp_path):
    """A trial: names of 12,000 characters made a file the reader refused (its manifest allowance was a fixed 1 KiB
    per tensor); the allowance follows the model's names now."""

    def build():
        torch.manual_seed(0)
        root = nn.ModuleDict()
        for i in range(20):
            level = root
            for depth in range(4):
                key = f"L{depth}_{'k' * 3000}_{i}"
                level[key] = nn.ModuleDict()
                level = level[key]
            level["lin"] = nn.Linear(2, 2)
        return root

    model = build()
    save_compressed(model, tmp_path / "m.lcz")
    fresh = build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_writing_never_takes_over_a_file_of_the_users_beside_the_target(tmp_path):
    """A trial: `save_compressed` wrote through `<path>.tmp`: an existing file of that name was overwritten and
    removed, and a directory of that name raised a raw IsADirectoryError."""
    from lightning_compress import export_onnx

    model = compressed_net(0.5, config=QuantConfig(8, 8))
    (tmp_path / "m.lcz.tmp").write_text("mine")
    (tmp_path / "m.onnx.tmp").mkdir()
    (tmp_path / "m.onnx.traced").write_text("mine too")
    save_compressed(model, tmp_path / "m.lcz")
    export_onnx(model, tmp_path / "m.onnx", inputs())
    assert (tmp_path / "m.lcz.tmp").read_text() == "mine" and (tmp_path / "m.onnx.tmp").is_dir()
    assert (tmp_path / "m.onnx.traced").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lcz", "m.lcz.tmp", "m.onnx", "m.onnx.tmp", "m.onnx.traced"]
    load_compressed(Net(), tmp_path / "m.lcz")


def test_refusals_name_the_cause_a_float32_file_or_a_model_already_quantized(tmp_path):
    """A trial: a float32 file into a float64 model suggested `precision='bf16-true'`; a float file into a model
    already converted with `convert_to_qat` was 'written for another architecture'; a forged zero point's refusal
    was the one message without the file's name."""
    save_compressed(compressed_net(0.5, config=None), tmp_path / "float.lcz")
    with pytest.raises(CompressedFileError, match=r"written from a torch.float32 model\. Convert the fresh model"):
        load_compressed(Net().double(), tmp_path / "float.lcz")
    save_compressed(compressed_net(0.5, config=None).half(), tmp_path / "half.lcz")  # trial EF: it said bf16-true
    with pytest.raises(CompressedFileError, match=r"torch.float16 model \(e\.g\. `precision='16-true'`\)\. Convert"):
        load_compressed(Net(), tmp_path / "half.lcz")
    converted = Net()
    convert_to_qat(converted, QuantConfig(8, 8))
    with pytest.raises(CompressedFileError, match=r"holds no quantizer state .* not converted with `convert_to_qat`"):
        load_compressed(converted, tmp_path / "float.lcz")
    model = compressed_net(0.5, config=QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.input_fake_quant.zero_point.fill_(-5)
    save_compressed(model, tmp_path / "zp.lcz")
    with pytest.raises(CompressedFileError, match=r"zp\.lcz: fc1\.input_fake_quant\.zero_point"):
        load_compressed(Net(), tmp_path / "zp.lcz")


def test_the_ratio_is_against_the_float_model_without_the_quantizers_state(tmp_path):
    """A trial: the baseline was `torch.save` of the converted model, quantizer scales, ranges and flags included (98
    entries on a 20k-parameter Qwen2): its file read 6.2x smaller than a float model it is 4.5x smaller than."""
    import io

    quantized = compressed_net(0.9, config=QuantConfig(8, 8))
    float_model = compressed_net(0.9, config=None)
    buffer = io.BytesIO()
    torch.save(float_model.state_dict(), buffer)
    report = save_compressed(quantized, tmp_path / "m.lcz")
    # exactly: trial BX found the quantizers' `_metadata` entries counted (3.9% over the float model on a Swinv2)
    assert report.baseline_bytes == buffer.tell()
    assert report.compression_ratio == pytest.approx(buffer.tell() / report.file_bytes, rel=1e-9)
    # trial BS: the state was counted without its `_metadata`, 1.5-3% below what `torch.save` writes
    assert save_compressed(float_model, tmp_path / "f.lcz").baseline_bytes == buffer.tell()


def _mlp(*widths):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("saved", "match"),
    [  # trial BH: each of these loaded; the forward then failed, or the model silently gave 5 classes of 10
        ((32, 128, 64, 10), r"sizes that do not fit together: the model no longer runs on the example inputs"),
        ((64, 100, 64, 10), r"sizes that do not fit together: .*RuntimeError: mat1 and mat2 shapes"),
        ((64, 128, 64, 5), r"sizes that change the model's outputs: shapes \[\(2, 10\)\] became \[\(2, 5\)\]"),
    ],
)
def test_a_compacted_file_whose_sizes_do_not_chain_or_cut_an_output_is_refused_given_example_inputs(
    tmp_path, saved, match
):
    from lightning_compress.core.compact import mark_compacted

    forged = _mlp(*saved)
    if saved[1] == 100:  # a producer cut without its consumer
        forged[2] = nn.Linear(128, 64)
    mark_compacted(forged)  # what compact() leaves: the file says its layers may be smaller than a fresh model's
    save_compressed(forged, tmp_path / "forged.lcz")
    torch.manual_seed(0)
    model = _mlp(64, 128, 64, 10)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 64)
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(model, tmp_path / "forged.lcz", example_inputs=x)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.example_input_array = x  # a LightningModule's inputs are used when none are passed
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(model, tmp_path / "forged.lcz")


def test_a_genuine_compacted_file_passes_the_chain_check_and_inputs_the_model_does_not_take_are_named(tmp_path):
    from lightning_compress import compact, prune_

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = _mlp(64, 128, 64, 10).eval()
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    compact(model, x)
    save_compressed(model, tmp_path / "c.lcz")
    fresh = _mlp(64, 128, 64, 10)
    load_compressed(fresh, tmp_path / "c.lcz", example_inputs=x)
    assert fresh[0].out_features == model[0].out_features < 128
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    with pytest.raises(ValueError, match=r"`example_inputs` does not run through Sequential's forward before loading"):
        load_compressed(_mlp(64, 128, 64, 10), tmp_path / "c.lcz", example_inputs=torch.zeros(2, 3))
    unfit = _mlp(64, 128, 64, 10)
    unfit.example_input_array = torch.zeros(2, 3)  # picked up, not given: the check is skipped and said
    with pytest.warns(UserWarning, match=r"`example_input_array` does not run .* sizes of .* is not checked"):
        load_compressed(unfit, tmp_path / "c.lcz")
    assert torch.equal(outputs(unfit, x), outputs(model, x))


def test_a_bfloat16_model_loads_a_compacted_file_checked_on_its_float32_example_input_array(tmp_path):
    """Trial BJ: a bf16 LightningModule's float32 `example_input_array` (as Lightning users leave it) refused a
    genuine compacted file: the inputs now take the model's dtype."""
    from lightning_compress import compact, prune_

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = _mlp(64, 128, 64, 10).to(torch.bfloat16).eval()
    prune_(model, 0.5, granularity="channel", example_inputs=x.to(torch.bfloat16))
    compact(model, x.to(torch.bfloat16))
    save_compressed(model, tmp_path / "c.lcz")
    fresh = _mlp(64, 128, 64, 10).to(torch.bfloat16)
    fresh.example_input_array = (x,)  # float32, in a tuple
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_compressed(fresh, tmp_path / "c.lcz")
    assert torch.equal(outputs(fresh, x.to(torch.bfloat16)), outputs(model, x.to(torch.bfloat16)))


@pytest.mark.parametrize(
    "norm",
    [lambda c: nn.BatchNorm2d(c, affine=False), lambda c: nn.InstanceNorm2d(c, track_running_stats=True)],
    ids=["batchnorm-no-affine", "instancenorm-running-stats"],
)
def test_a_compacted_norm_without_a_weight_loads_into_a_fresh_instance(tmp_path, norm):
    """Trial BS: `compact()` cut a norm's running statistics, but loading shrank only modules with a weight, so the
    file of a model with `BatchNorm2d(affine=False)` loaded into nothing ("written for another architecture")."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 8, 3, padding=1)
            self.norm = norm(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.norm(self.c1(x)))
            return self.fc(torch.relu(self.c2(h)).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = Normed()
    model(x)  # running statistics of their own
    model.eval()
    prune_(model, 0.5, granularity="channel", example_inputs=x)
    compact(model, x)
    assert model.norm.running_mean.shape == (4,)
    save_compressed(model, tmp_path / "m.lcz")
    fresh = Normed().eval()
    load_compressed(fresh, tmp_path / "m.lcz", example_inputs=x)
    assert fresh.norm.running_var.shape == (4,) and fresh.norm.num_features == 4
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_a_zero_is_stored_alike_whatever_its_sign(tmp_path):
    # a mask's multiply leaves -0.0 where a weight was negative; FSDP2 and DDP runs made files differing in those bits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.0, -1.0, 2.0]))
    save_compressed(model, tmp_path / "plus.lcz")
    with torch.no_grad():
        model[1].bias[0] = -0.0
    save_compressed(model, tmp_path / "minus.lcz")
    assert (tmp_path / "plus.lcz").read_bytes() == (tmp_path / "minus.lcz").read_bytes()
    load_compressed(fresh := nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), tmp_path / "minus.lcz")
    assert torch.equal(fresh[1].bias, model[1].bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_file_loads_with_its_quantizers_in_the_models_dtype(dtype, tmp_path):
    """Trial EF: a file written from a float16 model (a `16-true` fit) loaded into `Net().half()` with its quantizers'
    scales and ranges in float32; the outputs were the same, but saved again the file grew."""
    model = compressed_net(0.5, QuantConfig(8, 8)).to(dtype)
    first = save_compressed(model, tmp_path / "a.lcz")
    fresh = Net().to(dtype)
    load_compressed(fresh, tmp_path / "a.lcz")
    assert {t.dtype for _, q in quantizers(fresh) for t in q.state_dict().values() if t.is_floating_point()} == {dtype}
    with torch.no_grad():
        assert torch.equal(fresh.eval()(inputs().to(dtype)), model.eval()(inputs().to(dtype)))
    assert save_compressed(fresh, tmp_path / "b.lcz").file_bytes == first.file_bytes


def test_a_model_with_non_finite_weights_or_scales_is_refused_before_anything_is_written(tmp_path):
    """Trial ED: a BERT whose float16 fit diverged was written "51x smaller", and loading the file then called it
    corrupted. Non-finite weights or quantizer state are refused at saving; other buffers may hold infinities."""
    model = compressed_net(0.5, QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in \['fc1\.weight'\]: the fit diverged"):
        save_compressed(model, tmp_path / "w.lcz")
    model = compressed_net(0.5, QuantConfig(8, 8))
    with torch.no_grad():
        model.fc1.input_fake_quant.max_val.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"\['fc1\.input_fake_quant\.max_val'"):
        save_compressed(model, tmp_path / "q.lcz")
    assert not list(tmp_path.iterdir())
    model = compressed_net(0.5, QuantConfig(8, 8))
    model.register_buffer("mask", torch.full((2, 2), float("-inf")))  # an attention mask: kept as it is
    save_compressed(model, tmp_path / "m.lcz")


class _MatrixHead(nn.Module):
    """Reformer's tied output head: keeps the embedding's weight as a Parameter of its own name and multiplies by it."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.tensor = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.tensor.t()


class _TiedThroughAParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.head = _MatrixHead(self.emb.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_a_quantized_embedding_tied_to_another_modules_parameter_is_stored_in_float_and_reloads(tmp_path):
    """Trial FL: Reformer's head keeps the embedding's weight as `out.1.tensor`; with the embedding quantized the file
    held its codes and a float copy, and `load_compressed` into the same architecture refused it, saying the file came
    from a model that does not tie them."""
    torch.manual_seed(0)
    model, ids = _TiedThroughAParameter(), torch.randint(0, 50, (2, 6))
    convert_to_qat(model, QuantConfig(8, 8), include=["emb", "*"])
    calibrate(model, [ids])
    enable_fake_quant(model)
    model.eval()
    with pytest.warns(UserWarning, match=r"\['emb'\] are quantized, but their weights are also used in float by "
                      r"\['head\.tensor'\]"):  # fmt: skip
        save_compressed(model, tmp_path / "m.lcz")
    fresh = _TiedThroughAParameter()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert fresh.head.tensor is fresh.emb.weight
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model(ids))


class _Blocks(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
        self.head = nn.Linear(8, 3)
        if checkpointed:  # as torchtune's `set_activation_checkpointing`: a block, and a layer on its own
            self.block, self.head = checkpoint_wrapper(self.block), checkpoint_wrapper(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(x)))


def test_an_activation_checkpointed_model_saves_and_loads_under_the_plain_names(tmp_path):
    """Trial GB: with torchtune's activation checkpointing, the file named the quantizers under
    `_checkpoint_wrapped_module`: it loaded neither into a plain model nor into a freshly wrapped one."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    x = torch.randn(16, 8)
    files = {}
    for checkpointed in (False, True):
        model = _Blocks(checkpointed)
        prune_(model, 0.6, importance="magnitude")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the wrapped head was said to be a tied layer left float
            convert_to_qat(model, QuantConfig(8, 8))
        calibrate(model, [torch.randn(32, 8)])
        enable_fake_quant(model)
        files[checkpointed] = tmp_path / f"{checkpointed}.lcz"
        save_compressed(model, files[checkpointed])
        expected = model.eval()(x)
    assert files[True].read_bytes() == files[False].read_bytes()
    for checkpointed in (False, True):
        fresh = _Blocks(checkpointed)
        load_compressed(fresh, files[True])
        torch.testing.assert_close(fresh.eval()(x), expected, atol=0, rtol=0)
        assert isinstance(fresh.head, CheckpointWrapper) == checkpointed  # the converted head stays wrapped
        assert len(qat_modules(fresh)) == 3


def test_state_entries_that_are_not_tensors_are_left_out_said_and_kept_as_the_loading_model_has_them(tmp_path):
    """Trial GJ: nequip's training module (a dict as a module's extra state) was refused, with advice that could not
    leave the entry out; trial GK: neuraloperator's models add a `_metadata` dict in their own `state_dict`, and
    neither the model nor a submodule could be saved."""
    from tests.conftest import ModuleWithExtraState

    class WithMetadata(nn.Sequential):  # as neuralop's BaseModel
        def state_dict(self, *args, **kwargs):
            state = super().state_dict(*args, **kwargs)
            state["_metadata"] = {"n_modes": (8, 8)}
            return state

    x = torch.randn(3, 16)
    for build in (ModuleWithExtraState, lambda: WithMetadata(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))):
        torch.manual_seed(0)
        model = build()
        prune_(model, 0.5)
        if isinstance(model, ModuleWithExtraState):
            model.loss.coefficients["forces"] = 1.0  # the loading model keeps its own
        with pytest.warns(
            UserWarning,
            match=r"leaves out the state dict entries that are not tensors, "
            r"\['(loss\._extra_state|_metadata)'\] \(dict: .*load_compressed leaves them as the model",
        ):
            report = save_compressed(model, tmp_path / "m.lcz")
        assert report.compression_ratio > 1.5
        torch.manual_seed(1)
        fresh = build()
        load_compressed(fresh, tmp_path / "m.lcz")
        assert torch.equal(fresh(x), model(x))
        if isinstance(fresh, ModuleWithExtraState):
            assert fresh.loss.coefficients["forces"] == 10.0


def test_complex_weights_pruned_by_name_are_stored_sparse_counted_by_the_estimate_and_reload_exactly(tmp_path):
    """Trial GK: FNO's complex spectral weights, pruned by an exact name, were stored dense (a floating-point tensor
    only was stored as positions and values), and the size estimate listed and counted them dense."""
    from lightning_compress.core.summary import estimate_size
    from tests.conftest import FourierModule

    model = FourierModule()
    prune_(model, 0.8, include=["*", "spectral"])
    report = save_compressed(model, tmp_path / "m.lcz")
    row = next(layer for layer in report.layers if layer.name == "spectral.weight")
    assert row.sparsity > 0.7 and row.bytes_after < 0.3 * row.bytes_before
    size = estimate_size(model)
    spectral = next(layer for layer in size.layers if layer.name == "spectral.weight")
    assert spectral.bits == 64 and spectral.sparsity > 0.7 and spectral.bytes < 0.3 * spectral.dense_bytes
    fresh = FourierModule()
    with torch.no_grad():
        fresh.spectral.weight.normal_()
    load_compressed(fresh, tmp_path / "m.lcz")
    x = torch.randn(2, 1, 32)
    assert torch.equal(fresh.spectral.weight, model.spectral.weight) and torch.equal(fresh(x), model(x))
