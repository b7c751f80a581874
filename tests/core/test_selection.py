import re
import warnings

import pytest
import torch
from torch import nn

from lightning_compress import prune_
from lightning_compress.core.selection import select_targets
from tests.conftest import FlatLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 1))
        self.head = nn.Linear(8, 2)


def names(model, **kw):
    return [t.name for t in select_targets(model, **kw)]


def test_default_selects_linear_and_conv_weights_only():
    assert names(Net()) == ["encoder.0", "encoder.2", "head"]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["encoder.*"], None, ["encoder.0", "encoder.2"]),  # wildcard: Linear/Conv only, not the LayerNorm
        (["embed", "head"], None, ["embed", "head"]),  # exact name: any module's weight
        (None, ["head"], ["encoder.0", "encoder.2"]),
        ("*", "encoder.*", ["head"]),
        (["encoder.1"], None, ["encoder.1"]),
    ],
)
def test_include_exclude(include, exclude, expected):
    assert names(Net(), include=include, exclude=exclude) == expected


def test_biases_are_never_selected():
    targets = select_targets(Net())
    assert all(t.param_name.endswith(".weight") for t in targets)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": ["nope*"]}, ValueError, "`include` pattern 'nope\\*' matches no module"),
        ({"exclude": ["missing"]}, ValueError, "`exclude` pattern 'missing' matches no module"),
        ({"exclude": ["*"]}, ValueError, "select no weight"),
        ({"include": 3}, TypeError, "`include` must be None, a glob string"),
        ({"include": []}, ValueError, "`include` is an empty sequence"),
    ],
)
def test_bad_patterns(kwargs, error, match):
    with pytest.raises(error, match=match):
        select_targets(Net(), **kwargs)


def test_model_without_prunable_layers():
    with pytest.raises(ValueError, match="select no weight of Sequential"):
        select_targets(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_tied_weights_are_selected_once():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    targets = select_targets(nn.Sequential(a, b))
    assert [t.name for t in targets] == ["0"]


def test_a_layer_sharing_an_excluded_layers_weight_is_left_out_with_a_warning():
    """`exclude` wins over a tie: pruning the partner would prune the excluded layer (trial DD: `exclude=['0']`
    left layer 0 79.9% zeros through layer 1, in silence)."""
    from lightning_compress import prune_

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = model[0].weight
    with pytest.warns(
        UserWarning, match=r"leaves \['1'\] out: their weight is also the weight of \['0'\], which `exclude`"
    ):
        assert [t.name for t in select_targets(model, exclude=["0"])] == ["2"]
    with pytest.warns(UserWarning, match="which `exclude` leaves out"):
        prune_(model, 0.8, exclude=["0"])
    assert (model[0].weight == 0).sum() == 0 and (model[2].weight == 0).float().mean() > 0.5
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"sharing an excluded layer's weight: \['1'\]"):
        select_targets(model, exclude=["0", "2"])
    model.append(nn.Linear(4, 4))
    model[3].weight = model[0].weight  # three modules of one weight: both others named (trial DF: only the first)
    with pytest.warns(UserWarning, match=r"leaves \['1', '3'\] out: their weight is also the weight of \['0'\]"):
        assert [t.name for t in select_targets(model, exclude=["0"])] == ["2"]


def test_a_module_registered_under_two_names_answers_to_either():
    """Trial DK: with `self.classifier = self.head`, `exclude=["classifier"]` (or `include`) said the pattern matched
    no module: only the first name was looked at. The layer is still selected once, under its first name."""
    from lightning_compress import QuantConfig, convert_to_qat

    model = Net()
    model.classifier = model.head
    assert names(model, exclude=["classifier"]) == ["encoder.0", "encoder.2"]
    assert names(model, exclude=["classif*"]) == ["encoder.0", "encoder.2"]
    assert names(model, include=["classifier"]) == ["head"]
    assert names(model) == ["encoder.0", "encoder.2", "head"]
    with pytest.raises(ValueError, match="pattern 'classifer' matches no module"):
        names(model, exclude=["classifer"])
    convert_to_qat(model, QuantConfig(8, 8), exclude=["classifier"])
    assert type(model.head) is nn.Linear and type(model.encoder[0]) is not nn.Linear


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight (GPT-2's `lm_head` / `wte`)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(32, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 32, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.block(self.wte(idx))))


def test_a_head_tied_to_an_embedding_is_left_out_unless_named():
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"leaves \['lm_head'\] out: their weight is also an nn.Embedding's"):
        assert [t.name for t in select_targets(model)] == ["block"]
    with pytest.warns(UserWarning, match="lm_head"):
        assert [t.name for t in select_targets(model, include=["*"])] == ["block"]
    assert [t.name for t in select_targets(model, include=["lm_head"])] == ["lm_head"]  # opted in, no warning
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"left out as tied to an embedding: \['lm_head'\]"):
        select_targets(model, exclude=["block"])


def test_a_head_tied_to_a_selected_embedding_is_not_said_to_be_left_out(recwarn):
    """With the embedding named, the wildcard's tied head was said to be left out "so as not to change the
    embedding", while the embedding's weight, which is the head's, was selected (pruned or quantized for both)."""
    model = TiedLM()
    assert [t.name for t in select_targets(model, include=["wte", "*"])] == ["wte", "block"]
    assert not [w for w in recwarn if "lm_head" in str(w.message)]


def test_reading_the_sparsity_of_a_model_with_a_tied_head_warns_nothing(recwarn):
    """`sparsity()` only reads: the tied head pruning leaves out is said by pruning, not at every call (trial CS: a
    warning per call, after every fit of T5, BART, Mistral...)."""
    from lightning_compress import sparsity
    from lightning_compress.core.summary import estimate_size

    model = TiedLM()
    with torch.no_grad():
        model.block.weight[:4] = 0.0
    assert sparsity(model) == 0.5  # the block alone, as pruning selects
    estimate_size(model)
    assert [str(w.message) for w in recwarn] == []
    with pytest.warns(UserWarning, match="lm_head"):  # pruning and selection still say it
        select_targets(model)


def test_prune_never_zeroes_a_tied_embedding_by_default():
    from lightning_compress import prune_

    torch.manual_seed(0)
    model = TiedLM()
    embedding = model.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied output head"):
        prune_(model, 0.9)
    assert torch.equal(model.wte.weight, embedding)
    assert float((model.block.weight == 0).float().mean()) >= 0.85


class Recurrent(nn.Module):
    """Linear -> GRU -> Linear: the GRU's weights are `weight_ih_l0`, ... (no `weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 2)


def test_an_exact_name_without_a_weight_is_refused_beside_other_patterns():
    """`include=["gru", "*"]` dropped the GRU silently (found by a held-out trial); alone it was refused."""
    with pytest.raises(ValueError, match=r"`include` names \['gru'\], which have no `weight`"):
        select_targets(Recurrent(), include=["gru", "*"])
    with pytest.raises(ValueError, match=r"\['gru'\] have no `weight`"):
        select_targets(Recurrent(), include=["gru"])
    assert names(Recurrent(), include=["*"], exclude=["gru"]) == ["inp", "attn.out_proj", "out"]


def test_pruning_selects_the_matrices_of_recurrent_and_attention_layers():
    """A GRU classifier pruned 'to 90%' pruned only its head: 768 of 46,408 weights (a held-out trial), and naming
    the GRU was refused as having no `weight`. Its matrices are what it multiplies, as a Linear's weight is."""
    model = Recurrent()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense to warn about
        chosen = [t.param_name for t in select_targets(model, module_tensors=True)]
    assert chosen == [
        "inp.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "attn.in_proj_weight", "attn.out_proj.weight",
        "out.weight",
    ]  # fmt: skip
    assert [t.param_name for t in select_targets(model, include=["gru"], module_tensors=True)] == [
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
    ]
    assert [t.param_name for t in select_targets(model, include=["a*"], module_tensors=True)] == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    assert "gru.weight_ih_l0" not in [t.param_name for t in select_targets(model, exclude=["gru"], module_tensors=True)]
    separate = nn.MultiheadAttention(16, 2, kdim=8, vdim=4)  # q/k/v_proj_weight instead of a packed in_proj_weight
    assert [t.attr for t in select_targets(separate, module_tensors=True)] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "weight",
    ]
    bidirectional = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    attrs = [t.attr for t in select_targets(bidirectional, module_tensors=True)]
    assert len(attrs) == 12 and "weight_hr_l1_reverse" in attrs and not any("bias" in a for a in attrs)
    assert all(t.in_axis == 1 for t in select_targets(bidirectional, module_tensors=True))


def test_quantization_selection_leaves_recurrent_layers_out_and_says_why():
    assert names(Recurrent()) == ["inp", "attn.out_proj", "out"]  # the selection QAT then narrows
    with pytest.raises(ValueError, match=r"\['gru'\] multiply their weights inside their own forward"):
        select_targets(Recurrent(), include=["gru"])


def test_selecting_never_runs_a_parametrization():
    """Reading a spectral_norm layer's `weight` in training mode runs a power iteration that updates its buffers
    (trial DD: a fit refused before training had changed `parametrizations.weight.0._u` and `._v`)."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    model = nn.Sequential(spectral_norm(nn.Linear(4, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 8)), nn.Linear(8, 2))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for module_tensors in (False, True):  # weight_norm has no single `original`: still left out and said
        with pytest.warns(
            UserWarning, match=r"leaves \['0', '2'\] out: their weight is computed by a parametrization \(_Spe"
        ):
            assert [t.name for t in select_targets(model, module_tensors=module_tensors)] == ["3"]
    # trial DF: an exact name, the QAT tie check and `sparsity` still read `weight`
    from lightning_compress import QuantConfig, convert_to_qat, sparsity

    with pytest.raises(ValueError, match=r"`include` names \['0'\], whose weight is computed by a parametrization"):
        select_targets(model, include=["0"])
    with pytest.raises(ValueError, match=r"names \['0'\].*\(_SpectralNorm\)"):
        sparsity(model, include=["0", "3"])
    with pytest.warns(UserWarning, match="computed by a parametrization"):
        convert_to_qat(model, QuantConfig(8, 8))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if "fake_quant" not in k)


def test_saving_and_loading_never_run_a_parametrization(tmp_path):
    """Trial DH: `save_compressed` of a model in training mode ran spectral_norm's power iteration (`_u` changed)."""
    from torch.nn.utils.parametrizations import spectral_norm

    from lightning_compress import load_compressed, save_compressed

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(spectral_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2)).train()

    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_compressed(model, tmp_path / "m.lcz")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = build()
    load_compressed(fresh, tmp_path / "m.lcz")
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


def test_matrices_a_module_multiplies_itself_are_said_when_left_dense():
    """Trial DX: XLNet's attention holds its q, k, v, o and r as 3-d Parameters it multiplies through einsum; pruning
    left them dense (52% of the model's matrices) and `sparsity` read 0.900, with nothing said. Said now, with their
    share (its 2-d r_w_bias, r_r_bias, r_s_bias are biases, not counted since session 41); not for a model whose
    unselected tensors are a few position embeddings (ViT) or none (BERT)."""
    transformers = pytest.importorskip("transformers")
    from lightning_compress import prune_

    torch.manual_seed(0)
    xlnet = transformers.XLNetForSequenceClassification(
        transformers.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64, num_labels=3)
    )
    with pytest.warns(UserWarning, match=r"does not prune transformer\.layer\.0\.rel_attn\.q \(32, 2, 16\), .* "
                      r"\(10,400 weights in 13 tensor\(s\), 1\.1x the 9,312 it prunes\)"):  # fmt: skip
        prune_(xlnet, 0.9)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64,
        )
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*does not prune")
        prune_(vit, 0.9)  # its position embeddings: 12% of the weights it prunes
        prune_(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)


def test_embedding_tables_larger_than_the_selection_are_named_with_how_to_include_them():
    """Trial ET: a recommender's embedding tables held 99% of its weights; the default pruned its MLPs to 90%,
    `sparsity` read 0.90 with 0.8% of the parameters zero, and nothing said the tables were left out. A language
    model's token embedding, smaller than its layers, is left out without a word."""
    import warnings

    from lightning_compress import prune_

    class Recommender(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.users, self.items = nn.Embedding(2000, 16), nn.EmbeddingBag(1000, 16)
            self.top = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            return self.top(torch.cat([self.users(user), self.items(items)], dim=1))

    with pytest.warns(UserWarning, match=r"does not prune the embedding tables \['users', 'items'\] \(48,000 weights"):
        prune_(Recommender(), 0.9)
    model = Recommender()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_(model, 0.9, include=["users", "items", "*"])  # named: pruned, nothing to say
        prune_(nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 64), nn.Linear(64, 50)), 0.5)
    assert float((model.users.weight == 0).float().mean()) > 0.5
    shared = nn.ModuleDict({"a": nn.Embedding(1000, 64), "b": nn.Embedding(1000, 64), "fc": nn.Linear(64, 1000)})
    shared["b"].weight = shared["a"].weight  # one table read twice (T5's `shared`): 64,000 weights, not 128,000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_(shared, 0.5)


class _ScriptedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c2(torch.relu(self.c1(x))))


class _WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.body = torch.jit.script(_ScriptedBlock())
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def test_layers_of_a_scripted_submodule_are_named_as_left_out_and_export_says_why_it_fails(tmp_path):
    """Trial FB: a `torch.jit.script`ed block's convolutions stayed dense and float without a word, and the export's
    failure advised replacing an operation or a newer opset."""
    model = _WithScripted()
    with pytest.warns(UserWarning, match=r"leaves \['body.c1', 'body.c2'\] out: they are layers compiled by") as said:
        targets = select_targets(model)
    assert [t.name for t in targets] == ["fc"]
    assert not [w for w in said if "does not prune" in str(w.message)]  # not also listed as einsum operands
    assert [t.name for t in select_targets(model, include=["fc", "body.c1"])] == ["body.c1", "fc"]
    pytest.importorskip("onnx")
    from lightning_compress import export_onnx

    with pytest.raises(ValueError, match=r"calls a submodule compiled by `torch.jit.script`, which the ONNX tracer"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))


def test_the_selections_warnings_name_the_users_call_not_the_package():
    """Trial FD: `prune_`'s warning about a tied head was attributed to lightning_compress/core/functional.py."""
    from lightning_compress import prune_

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(self.emb(x)))

    with pytest.warns(UserWarning, match=r"leaves \['head'\] out") as said:
        prune_(Tied(), 0.5)
    assert {w.filename for w in said if "leaves ['head'] out" in str(w.message)} == {__file__}


class _EnsembleLayer(nn.Module):
    """TabM's ensemble layer, in short: a (k, in, out) weight, a (k, out) bias and a (k, in) scaling it applies."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, 8))
        self.bias, self.r = nn.Parameter(torch.zeros(4, 8)), nn.Parameter(torch.ones(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bki,kio->bko", x.unsqueeze(1) * self.r, self.weight) + self.bias


def test_matrices_left_dense_leave_biases_out_and_say_which_module_names_opt_them_in():
    """Trial FI: TabM's 2-d ensemble biases were counted among the weights left dense, and the warning named no
    module to pass in `include` (an exact name prunes any module's `weight`)."""
    from lightning_compress import prune_

    model = nn.Sequential(nn.Linear(16, 16), _EnsembleLayer(), nn.Flatten(), nn.Linear(32, 2))
    said = r"does not prune 1\.weight \(4, 16, 8\), 1\.r \(4, 16\) \(576 weights in 2 tensor"
    with pytest.warns(UserWarning, match=said + r".*exactly in `include` .*`include=\['\*', '1'\]`\): \['1'\]"):
        prune_(model, 0.5)
    opted = prune_(nn.Sequential(nn.Linear(16, 16), _EnsembleLayer(), nn.Flatten(), nn.Linear(32, 2)), 0.5,
                   include=["*", "1"])  # fmt: skip
    assert sorted(opted) == ["0.weight", "1.weight", "3.weight"]


class _RMSNorm(nn.Module):
    """A norm of its own class (as ``transformers``' ``LlamaRMSNorm``): its 1-d weight is a scale per channel."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_weights_stored_flat_are_said_to_be_left_dense_and_norm_scales_are_not():
    """Trial FN: e3nn's layers keep their weights 1-d, twelve times the weights selected; `prune_(model, 0.9)` pruned
    the Linear head alone and `sparsity()` read 0.90 with 0.3% of the weights zero, without a word (a 2-d weight of
    the same layer was said)."""
    from lightning_compress import prune_

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(FlatLinear(16, 256), _RMSNorm(256), nn.LayerNorm(256), nn.Linear(256, 1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_(model(), 0.9, include=["*"])
    messages = [str(w.message) for w in caught if "does not prune" in str(w.message)]
    assert len(messages) == 1, messages
    said = r"does not prune 0\.weight \(4096,\) \(4,096 weights in 1 tensor\(s\), 16\.0x the 256 it prunes\)"
    assert re.search(said, messages[0]), messages[0]
    assert "1.weight" not in messages[0] and "2.weight" not in messages[0]  # the norms' scales are no weights
    assert sorted(prune_(model(), 0.9, include=["*", "0"])) == ["0.weight", "3.weight"]


def test_a_default_selection_of_a_tenth_of_the_weight_matrices_or_less_is_refused():
    """Trial GH: tsl's AGCRN keeps 99.75% of its weights in its cells' 4-d weight pools; the default selected its
    input encoder and readout head, pruned the 48-weight head to 2, and `sparsity` read 0.80 (test MAE 0.73 against
    0.57 dense), with a warning reading "39525% as many as the 64 it prunes"."""
    from lightning_compress import prune_

    torch.manual_seed(0)
    model = nn.Sequential(FlatLinear(16, 256), nn.Linear(256, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"The default selection prunes 256 weights \(\['1'\]\), 5\.9% of the model's "
        r"weight matrices: the others, 0\.weight \(4096,\) \(4,096 weights in 1 tensor\(s\)\), are .*"
        r"`include=\['\*'\]` prunes the layers it selects now\. .*`include=\['\*', '0'\]`",
    ):
        prune_(model, 0.9)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    nine = nn.Sequential(FlatLinear(24, 96), nn.Linear(96, 2), nn.Linear(2, 40))  # 2,304 against 272: 8.5x, said
    with pytest.warns(UserWarning, match=r"8\.5x the 272 it prunes"):
        prune_(nine, 0.9)


class _OwnTensorType(torch.Tensor):
    """Stands for torchao's NF4Tensor, the type torchtune's QLoRA keeps its frozen base weights in."""


def test_weights_held_in_a_tensor_type_of_their_own_are_left_out_and_said():
    """Trial GD: QLoRA's NF4 base weights were selected as nn.Linear weights, and the fit failed counting zeros
    (`NF4Tensor dispatch: aten.count_nonzero`); the warning on unselected matrices advised naming them in `include`."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(_OwnTensorType), requires_grad=False)
    with pytest.warns(UserWarning, match=r"leaves \['0'\] out: their weights are tensors of a type of their own"):
        assert [t.name for t in select_targets(model)] == ["1"]
    with pytest.warns(UserWarning, match=r"leaves \['0'\] out"):  # a wildcard neither
        assert [t.name for t in select_targets(model, include=["*"])] == ["1"]


def test_a_parametrized_layer_named_exactly_beside_other_names_is_refused_not_dropped():
    """Trial GI: `include=["c1", "c2"]` with `c2` max-norm parametrized (braindecode's constraint) pruned `c1` alone,
    with the default's warning naming weight_norm, though the docs say an exact name picks that module's weight."""
    from torch.nn.utils.parametrize import register_parametrization

    class MaxNorm(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.renorm(p=2, dim=0, maxnorm=1.0)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    register_parametrization(model[2], "weight", MaxNorm())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"`include` names \['2'\], whose weight is computed by a parametrization "
        r"\(MaxNorm\).*remove_parametrizations",
    ):
        prune_(model, 0.5, include=["0", "2", "3"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"leaves \['2'\] out: their weight is computed by a parametrization \(MaxNo"):
        assert [t.name for t in select_targets(model, include=["*"])] == ["0", "3"]


class _DenseTensor(nn.Module):
    """tensorly-torch's ``DenseTensor``: the module neuraloperator's ``SpectralConv`` keeps its weight in."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.tensor = nn.Parameter(torch.randn(*shape, dtype=torch.cfloat))


class _SpectralConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = _DenseTensor(channels, channels, 6, 4)
        self.bias = nn.Parameter(torch.randn(channels, 1, 1))  # one per channel, broadcast over the grid


def test_a_fourier_layers_spectral_weights_are_offered_by_the_name_that_selects_them_and_its_bias_never():
    """Trial GK: naming neuraloperator's `SpectralConv` pruned its (channels, 1, 1) bias as if it were experts' weights;
    the advice offered only modules whose tensor is a `weight`, not the tensorly module holding the spectral weights,
    and the container advice ('convs.0.*') picked nothing."""
    from lightning_compress import prune_

    model = nn.Sequential(nn.Conv2d(2, 8, 1), _SpectralConv(8), nn.Conv2d(8, 1, 1))
    bias = model[1].bias.detach().clone()
    said = r"To prune them, name their modules exactly in `include` \(with the layers it "
    with pytest.raises(ValueError, match=said + r"selects now, e\.g\. `include=\['\*', '1\.weight'\]`\)"):
        prune_(model, 0.5)
    with pytest.raises(ValueError, match=r"`include` names \['1'\], which have no `weight`; an exact name of their "
                       r"submodules \['1\.weight'\] selects the weights they hold"):  # fmt: skip
        prune_(model, 0.5, include=["*", "1"])
    masks = prune_(model, 0.5, include=["*", "1.weight"])
    assert "1.weight.tensor" in masks and torch.equal(model[1].bias, bias)


class _RelativeAttention(nn.Module):
    """XLNet's attention: its projections held as 3-d Parameters used through einsum, a segment table of another
    first dimension, biases per head, and a LayerNorm."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.randn(width, heads, width // heads)))
        self.r_w_bias = nn.Parameter(torch.zeros(heads, width // heads))
        self.seg_embed = nn.Parameter(torch.randn(2, heads, width // heads))
        self.layer_norm = nn.LayerNorm(width)


class _PatchModel(nn.Module):
    """A ViT's shape at a large image: a position table far larger than its layers, added to the patches."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.position_embeddings = nn.Parameter(torch.randn(1, 4096, 16) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
        self.head = nn.Linear(16, 10)


def test_added_tables_do_not_refuse_the_default_and_the_refusal_says_when_no_name_selects_the_rest():
    """Trial GM: a 512-pixel ViT's position table (a Parameter, 36 times its layers) refused the default selection,
    where GPT-2's as an nn.Embedding is only said; XLNet's refusal offered no module, and naming its attention pointed
    at its LayerNorm."""
    from lightning_compress import prune_

    with pytest.warns(UserWarning, match=r"does not prune position_embeddings \(1, 4096, 16\)"):
        masks = prune_(_PatchModel(), 0.5)
    assert sorted(masks) == ["head.weight", "patch.weight"]
    model = nn.Sequential(nn.Linear(64, 8), _RelativeAttention(64, 4), nn.Linear(8, 64))
    with pytest.raises(ValueError, match=r"`include=\['\*'\]` prunes the layers it selects now\. No module name "
                       r"selects them \(not their module's `weight`\)\.$"):  # fmt: skip
        prune_(model, 0.5)
    with pytest.raises(ValueError, match=r"`include` names \['1'\], which have no `weight`: an exact name picks"):
        prune_(model, 0.5, include=["*", "1"])


class _KANLayer(nn.Module):
    """pykan's `KANLayer`: spline coefficients (in, out, basis) and scales it multiplies in its own forward, a frozen
    grid and mask, and (pykan's `Symbolic_KANLayer`) an affine branch that starts all zero."""

    def __init__(self, n_in: int, n_out: int, basis: int = 8) -> None:
        super().__init__()
        self.coef = nn.Parameter(torch.randn(n_in, n_out, basis) * 0.1)
        self.scale_base = nn.Parameter(torch.ones(n_in, n_out))
        self.grid = nn.Parameter(torch.linspace(-1, 1, basis + 4).repeat(n_in, 1), requires_grad=False)
        self.mask = nn.Parameter(torch.ones(n_in, n_out), requires_grad=False)
        self.symbolic = nn.Module()  # pykan keeps it in a module list of its own
        self.symbolic.affine = nn.Parameter(torch.zeros(n_in, n_out, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = torch.cos(x.unsqueeze(-1) * torch.arange(self.coef.shape[-1]))  # (batch, in, basis)
        spline = torch.einsum("bik,iok->bio", basis, self.coef)
        return ((spline + torch.nn.functional.silu(x).unsqueeze(-1) * self.scale_base) * self.mask).sum(1)


def test_a_kan_layer_named_exactly_is_selected_whatever_its_width_and_dead_tensors_are_no_weights_left_dense():
    """Trial GN: pykan's layers were selected by an exact name when their output width was above 1 and refused at 1
    (their (in, 1, basis) coefficients), the container advice picked nothing, and the warning counted the frozen grid
    and mask and the all-zero symbolic branch as weights left dense, offering that branch to `include`."""
    from lightning_compress import prune_
    from lightning_compress.core.summary import estimate_size

    torch.manual_seed(0)
    model = nn.Sequential(_KANLayer(4, 6), _KANLayer(6, 1))
    assert estimate_size(model).sparsity == 0.0 and not estimate_size(model).layers  # a fresh model: no compression
    from lightning_compress.core.selection import unselected_weights

    listed, total = unselected_weights(model, select_targets(model, include=["0", "1"], module_tensors=True))
    assert total == 30 and listed == "0.scale_base (4, 6), 1.scale_base (6, 1) (30 weights in 2 tensor(s)"
    assert sorted(prune_(model, 0.8, include=["0", "1"])) == ["0.coef", "1.coef"]
    with pytest.raises(ValueError, match=r"found no channel group it can prune: 0: the tensors a _KANLayer multiplies "
                       r"in its own forward \(coef\)"):  # fmt: skip
        prune_(nn.Sequential(_KANLayer(4, 6), _KANLayer(6, 1)), 0.5, granularity="channel", include=["0", "1"],
               example_inputs=torch.randn(2, 4))  # fmt: skip
