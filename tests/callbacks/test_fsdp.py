"""QuantizationAwareTraining under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes, gloo).

The same seed and data under DDP and FSDP2 must give the same model, quantizer state included, whole on
every rank; resuming a distributed checkpoint (a directory) must end where the uninterrupted run ends.
"""

import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.conftest import child_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = ["minmax", "power_of_two", "learned", "8da4w", "bias", "shift", "shift-root"]


def _script(name: str, cwd: pathlib.Path, *args: str) -> None:
    """Run ``tests/callbacks/<name>`` with ``args``; a failure shows the end of the script's output."""
    env = child_env()
    script = ROOT / "tests" / "callbacks" / name
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=cwd, timeout=600, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.stderr.write(f"{name} {args} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}\n")
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)


def _run(out: pathlib.Path, strategy: str, jobs: list[str]) -> None:
    _script("fsdp_script.py", out, str(out), strategy, ",".join(jobs))


def _dump(out: pathlib.Path, name: str) -> dict[str, torch.Tensor]:
    """What one rank of one job saved (``fsdp_script.py``)."""
    return torch.load(out / f"{name}.pt", weights_only=True)


@pytest.mark.slow
def test_qat_under_fsdp2_equals_ddp_and_resumes_a_distributed_checkpoint_exactly(tmp_path):
    _run(tmp_path, "fsdp2", [*RECIPES, "minmax@resume"])
    _run(tmp_path, "ddp", RECIPES)

    for job in [*RECIPES, "minmax@resume"]:
        ranks = [_dump(tmp_path, f"fsdp2-{job}_rank{r}") for r in (0, 1)]
        reference = _dump(tmp_path, f"ddp-{job}_rank0") if "@" not in job else _dump(tmp_path, "fsdp2-minmax_rank0")
        assert any(k.endswith("weight_fake_quant.scale") for k in reference)
        assert ranks[0].keys() == ranks[1].keys() == reference.keys()
        for key in reference:
            assert torch.equal(ranks[0][key], ranks[1][key]), (job, key)  # scales identical on every rank
            assert torch.equal(ranks[0][key], reference[key]), (job, key)
    assert (tmp_path / "minmax-ckpt" / "epoch=1.ckpt").is_dir()  # a distributed checkpoint was resumed


PRUNING = [
    "prune-magnitude", "prune-taylor", "prune-random", "prune-layer", "prune-guard", "prune-rewind", "prune-regrow",
    "prune-2:4",
    "prune-root", "prune-guard-root",  # regression: the root unit stayed gathered after validation, events missed it
]  # fmt: skip
RESUMED = ["prune-magnitude@resume", "prune-taylor@resume", "prune-guard@resume", "prune-regrow@resume"]


@pytest.mark.slow
def test_pruning_under_fsdp2_equals_ddp_and_resumes_a_distributed_checkpoint_exactly(tmp_path):
    """Every importance, both scopes, 2:4, the guard (with rollbacks), rewinding, regrowth: the masks FSDP2 computes
    from its shards (hidden size 37: shards of 19 and 18 rows) are DDP's, bit for bit, and so is the trained model."""
    _run(tmp_path, "fsdp2", [*PRUNING, *RESUMED])
    _run(tmp_path, "ddp", PRUNING)

    for job in [*PRUNING, *RESUMED]:
        ranks = [_dump(tmp_path, f"fsdp2-{job}_rank{r}") for r in (0, 1)]
        # a resumed run ends where the uninterrupted one does
        reference = _dump(tmp_path, f"ddp-{job.partition('@')[0]}_rank0")
        masks = [k for k in reference if k.startswith("pruning.net")]
        assert len(masks) == (1 if "2:4" in job else 3)  # 2:4: the two layers with 37 inputs stay dense
        assert ranks[0].keys() == ranks[1].keys()
        for key in reference:
            if key == "pruning.decisions" and "@" in job:
                continue  # decisions are not checkpointed: the resumed run only lists those taken after resuming
            assert torch.equal(ranks[0][key], ranks[1][key]), (job, key)
            assert torch.equal(ranks[0][key], reference[key]), (job, key)
        pruned = sum(int((~ranks[0][k]).sum()) for k in masks)
        total = sum(ranks[0][k].numel() for k in masks)
        for key in masks:  # pruned weights are exact zeros
            assert bool((ranks[0][key.removeprefix("pruning.")][~ranks[0][key]] == 0).all()), (job, key)
        if job.startswith("prune-guard"):
            decisions = _dump(tmp_path, f"ddp-{job.partition('@')[0]}_rank0")["pruning.decisions"]
            assert decisions.any() and not decisions.all()  # some events rolled back, some kept
        elif job.startswith("prune-2:4"):
            for key in masks:  # two of every four consecutive inputs, exactly
                assert bool((ranks[0][key].reshape(-1, 4).sum(-1) == 2).all()), (job, key)
        else:
            assert pruned == round(0.9 * total)  # exact sparsity
    assert (tmp_path / "prune-guard-ckpt" / "epoch=1.ckpt").is_dir()  # a distributed checkpoint was resumed


@pytest.mark.slow
def test_export_path_under_fsdp2_writes_the_file_ddp_writes(tmp_path):
    """``export_path`` at the end of a sharded fit (pruning, QAT, both): the model equals DDP's, every process
    gathers, rank 0 writes the same bytes as DDP's rank 0, and the file loads into the plain (unsharded) module."""
    from lightning_compress import load_compressed
    from tests.conftest import TinyModule

    jobs = ["prune-magnitude+export", "8da4w+export", "bias+export", "both+export"]  # both: pruning and QAT
    _run(tmp_path, "fsdp2", jobs)
    _run(tmp_path, "ddp", jobs)
    exports = tmp_path / "exports"  # created by the export (trial BU: FSDP2 failed after training)
    for recipe in ("prune-magnitude", "8da4w", "bias", "both"):
        assert (exports / f"fsdp2-{recipe}.lcz").read_bytes() == (exports / f"ddp-{recipe}.lcz").read_bytes()
        ranks = [torch.load(tmp_path / f"{s}-{recipe}+export_rank{r}.pt", weights_only=True) for s, r in
                 (("fsdp2", 0), ("fsdp2", 1), ("ddp", 0))]  # fmt: skip
        baseline = int(ranks[2].pop("report.baseline_bytes"))  # trial BU: FSDP2 counted one process's shards
        for rank in ranks[:2]:
            assert int(rank.pop("report.baseline_bytes")) == pytest.approx(baseline, rel=0.03), recipe  # alignment
        for key, value in ranks[2].items():
            assert torch.equal(ranks[0][key], value) and torch.equal(ranks[1][key], value), (recipe, key)
    trained = torch.load(tmp_path / "fsdp2-prune-magnitude+export_rank1.pt", weights_only=True)
    plain = TinyModule(hidden=37)
    load_compressed(plain, exports / "fsdp2-prune-magnitude.lcz")
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_onnx_and_compacted_exports_at_the_end_of_a_sharded_fit_equal_ddps(tmp_path):
    """An ``.onnx`` ``export_path`` (int8 QAT; pruning and 8da4w QAT in one fit) and channel pruning's compacted
    exports (``.lcz`` and ``.onnx``): every process gathers, rank 0 loads the model into a weightless copy of the
    module taken at ``setup`` and exports that: the same bytes as DDP's rank 0."""
    ort = pytest.importorskip("onnxruntime")
    from lightning_compress import load_compressed
    from tests.conftest import TinyModule

    jobs = ["minmax+onnx", "both+onnx", "prune-channel+export", "prune-channel+onnx"]
    _run(tmp_path, "fsdp2", jobs)
    _run(tmp_path, "ddp", jobs)
    for name in ("minmax.onnx", "both.onnx", "exports/prune-channel.lcz", "prune-channel.onnx"):
        folder, _, file = name.rpartition("/")
        where = tmp_path / folder
        assert (where / f"fsdp2-{file}").read_bytes() == (where / f"ddp-{file}").read_bytes(), name
    compacted = TinyModule(hidden=37)
    load_compressed(compacted, tmp_path / "exports" / "fsdp2-prune-channel.lcz")  # hidden layers: 19 of 37 neurons gone
    assert [compacted.net[i].out_features for i in (0, 2)] == [18, 18]
    x = torch.randn(5, 16)
    session = ort.InferenceSession(str(tmp_path / "fsdp2-prune-channel.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), compacted.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_channel_pruning_and_onnx_export_of_a_bf16_fit_under_fsdp2_and_ddp(tmp_path):
    """``precision="bf16-true"``: the channel groups are traced with inputs in the module's dtype, and the ``.onnx``
    export (float32 graph) holds exactly the trained bfloat16 weights of the kept neurons. Before: DDP failed at
    the trace (float inputs, bfloat16 weights); FSDP2 refused the gathered file (its dtypes were not the copy's)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    for strategy in ("fsdp2", "ddp"):  # bf16 training itself differs between the two (reduction order)
        _run(tmp_path, strategy, ["prune-channel+bf16"])
        state = _dump(tmp_path, f"{strategy}-prune-channel+bf16_rank0")
        assert state["net.0.weight"].dtype == torch.bfloat16
        graph = onnx.load(tmp_path / f"{strategy}-prune-channel.onnx").graph
        exported = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
        kept = [state[f"pruning.net.{i}.weight"].any(1) for i in (0, 2)]
        assert [int(k.sum()) for k in kept] == [18, 18]
        expected = {
            "net.0.weight": state["net.0.weight"][kept[0]], "net.0.bias": state["net.0.bias"][kept[0]],
            "net.2.weight": state["net.2.weight"][kept[1]][:, kept[0]], "net.2.bias": state["net.2.bias"][kept[1]],
            "net.4.weight": state["net.4.weight"][:, kept[1]], "net.4.bias": state["net.4.bias"],
        }  # fmt: skip
        for name, value in expected.items():
            assert exported[name].dtype == torch.float32
            assert torch.equal(exported[name], value.float()), (strategy, name)


@pytest.mark.slow
def test_an_onnx_export_from_shards_refuses_layers_built_in_configure_model_before_training(tmp_path):
    """The export rebuilds the module from its copy at ``setup``: a layer that ``configure_model`` adds would be
    missing at the end of fit, so the fit is refused at its start, naming the fix."""
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _run(tmp_path, "fsdp2", ["minmax+late"])
    assert "['head.weight', 'head.bias'] did not exist then (built in `configure_model`?)" in failed.value.stderr


def _llama_fsdp2_equals_ddp(out: pathlib.Path, *extra: str) -> dict[str, Any]:
    """Run ``fsdp_llama_script.py`` under FSDP2 and DDP; check masks, weights (both ranks) and loss are equal."""
    for strategy in ("fsdp2", "ddp"):
        _script("fsdp_llama_script.py", out, str(out), strategy, *extra)
    tag = "".join(f"-{e}" for e in extra)
    sharded, replicated = (torch.load(out / f"{s}{tag}_0.pt", weights_only=True) for s in ("fsdp2", "ddp"))
    other_rank = torch.load(out / f"fsdp2{tag}_1.pt", weights_only=True)
    assert sharded["masks"].keys() == replicated["masks"].keys()
    for name, mask in replicated["masks"].items():
        assert torch.equal(sharded["masks"][name], mask), name
    for key, value in replicated["state"].items():
        assert torch.equal(sharded["state"][key], value), key
        assert torch.equal(other_rank["state"][key], value), key
    assert sharded["val"] == replicated["val"]
    return sharded


@pytest.mark.slow
def test_pruning_a_transformers_llama_under_fsdp2_equals_ddp(tmp_path):
    """Code nobody here wrote: a `transformers` Llama (GQA, tied embeddings) sharded per decoder layer, Taylor
    importance, AdamW: the same masks, weights and validation loss as under DDP."""
    pytest.importorskip("transformers")
    sharded = _llama_fsdp2_equals_ddp(tmp_path)
    assert len(sharded["masks"]) == 14  # 2 layers x (q, k, v, o, gate, up, down); the tied head is left out
    total = sum(m.numel() for m in sharded["masks"].values())
    assert sum(int((~m).sum()) for m in sharded["masks"].values()) == round(0.7 * total)


@pytest.mark.slow
def test_quantizing_a_transformers_llama_with_its_tied_embedding_under_fsdp2_equals_ddp(tmp_path):
    """QAT of every layer and the tied embedding, whose head shares the embedding's weight quantizer (one module under
    two names, the weight sharded once): the same weights, quantizer states and validation loss as under DDP."""
    pytest.importorskip("transformers")
    sharded = _llama_fsdp2_equals_ddp(tmp_path, "qat")
    state = sharded["state"]
    assert torch.equal(
        state["model.lm_head.weight_fake_quant.scale"], state["model.model.embed_tokens.weight_fake_quant.scale"]
    )
    assert "model.lm_head.input_fake_quant.scale" in state  # the head's own input quantizer


@pytest.mark.slow
def test_pruning_heads_and_neurons_of_a_transformers_llama_under_fsdp2_equals_ddp(tmp_path):
    """Channel pruning on the sharded Llama: whole key/value head groups and gated MLP neurons, Taylor scores from
    each process's shards: DDP's masks, weights and loss, and the compacted export (heads 2 -> 1 key/value groups,
    MLP 176 -> 88 per layer) is DDP's file, byte for byte."""
    pytest.importorskip("transformers")
    from lightning_compress import load_compressed
    from tests.callbacks.fsdp_llama_script import LM

    _llama_fsdp2_equals_ddp(tmp_path, "channel")
    assert (tmp_path / "fsdp2.lcz").read_bytes() == (tmp_path / "ddp.lcz").read_bytes()
    plain = LM()  # the unsharded module
    load_compressed(plain, tmp_path / "fsdp2.lcz")
    for layer in plain.model.model.layers:
        assert layer.mlp.up_proj.out_features == 88


@pytest.mark.slow
def test_channel_pruning_of_a_wrapped_gpt2_under_fsdp2_equals_ddp(tmp_path):
    """GPT-2's Conv1D layers store weights (in, out): its neurons are columns of the producing layers and
    rows, split over the processes, of the consuming ones. Heads and neurons pruned from the shards are DDP's,
    and the compacted files are the same bytes (heads 4 -> 2, MLP 192 -> 96 per block)."""
    pytest.importorskip("transformers")
    from lightning_compress import load_compressed
    from tests.callbacks.fsdp_gpt2_script import LM

    for strategy in ("fsdp2", "ddp"):
        _script("fsdp_gpt2_script.py", tmp_path, str(tmp_path), strategy)
    sharded, replicated = (torch.load(tmp_path / f"{s}_0.pt", weights_only=True) for s in ("fsdp2", "ddp"))
    assert sharded["masks"].keys() == replicated["masks"].keys() and len(sharded["masks"]) == 12
    for name, mask in replicated["masks"].items():
        assert torch.equal(sharded["masks"][name], mask), name
    for key, value in replicated["state"].items():
        assert torch.equal(sharded["state"][key], value), key
    assert (tmp_path / "fsdp2.lcz").read_bytes() == (tmp_path / "ddp.lcz").read_bytes()
    plain = LM()
    load_compressed(plain, tmp_path / "fsdp2.lcz")
    assert [block.mlp.c_fc.nf for block in plain.model.transformer.h] == [96, 96]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["learned-sharded", "learned-sharded-act"])
def test_learned_scales_left_to_fully_shard_are_refused_with_the_fix(tmp_path, job):
    """LSQ scales must stay whole under FSDP2; sharded ones are refused before training, naming the fix. A 0-dim
    (activation) scale makes fully_shard itself refuse, asking to change the model: the fix is noted under it."""
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _run(tmp_path, "fsdp2", [job])
    assert "ignored_params=lightning_compress.learned_scales(self)" in failed.value.stderr


@pytest.mark.slow
def test_full_state_checkpoints_of_a_sharded_pruning_run_load_into_the_plain_module(tmp_path):
    """``save_distributed_checkpoint=False``: one file whose weights load into the unsharded module with
    ``strict=True`` and whose pruning state holds whole masks, which the weights carry."""
    from tests.conftest import TinyModule

    _run(tmp_path, "fsdp2", ["prune-magnitude+fullckpt"])
    checkpoint = torch.load(tmp_path / "prune-magnitude-full" / "epoch=3.ckpt", weights_only=True)
    plain = TinyModule(hidden=37)
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("IterativePruning")]
    masks = state["pruner"]["masks"]
    assert sorted(masks) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    for name, mask in masks.items():
        weight = plain.state_dict()[name]
        assert mask.shape == weight.shape and bool((weight[~mask] == 0).all()), name
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)


@pytest.mark.slow
def test_compression_monitor_under_fsdp2_reports_what_ddp_reports(tmp_path):
    """The monitor gathers sharded weights one layer at a time: the same summary as DDP, and TensorBoard gets
    the weight histograms and charts from rank 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, "fsdp2", ["both+monitor"])
    _run(tmp_path, "ddp", ["both+monitor"])
    sharded, replicated = (
        torch.load(tmp_path / f"{s}-both+monitor_rank0.pt", weights_only=True) for s in ("fsdp2", "ddp")
    )
    assert torch.equal(sharded["monitor"], replicated["monitor"])  # sparsity, bytes, ratio
    assert 0.89 < float(sharded["monitor"][0]) < 0.91
    (run,) = (tmp_path / "fsdp2-tb" / "lightning_logs").iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert {"compress/weights/net.0.weight", "compress/weights/net.4.weight"} <= set(events.Tags()["histograms"])
    assert "compress/charts/layer_sparsity" in events.Tags()["images"]


CHANNEL = ["prune-channel", "prune-channel-global", "prune-channel-random", "prune-channel-macs", "prune-channel-guard"]


@pytest.mark.slow
def test_channel_pruning_under_fsdp2_equals_ddp_and_resumes_a_distributed_checkpoint_exactly(tmp_path):
    """Channel groups are traced at setup, before `fully_shard`; each process scores the rows its shards hold (19 and
    18 of 37 neurons) and the columns of the consuming layer, one sum gives both the whole scores: the masks and the
    trained model are DDP's, bit for bit, whole neurons are pruned, and a resumed run ends where the uninterrupted
    one does."""
    _run(tmp_path, "fsdp2", [*CHANNEL, "prune-channel@resume"])
    _run(tmp_path, "ddp", CHANNEL)

    for job in [*CHANNEL, "prune-channel@resume"]:
        ranks = [_dump(tmp_path, f"fsdp2-{job}_rank{r}") for r in (0, 1)]
        reference = _dump(tmp_path, f"ddp-{job.partition('@')[0]}_rank0")
        masks = sorted(k for k in reference if k.startswith("pruning.net"))
        assert masks == [f"pruning.net.{i}.{a}" for i in (0, 2) for a in ("bias", "weight")] + ["pruning.net.4.weight"]
        for key in reference:
            if key == "pruning.decisions" and "@" in job:
                continue
            assert torch.equal(ranks[0][key], ranks[1][key]), (job, key)
            assert torch.equal(ranks[0][key], reference[key]), (job, key)
        first, second, last = (ranks[0][f"pruning.net.{i}.weight"] for i in (0, 2, 4))
        kept = [first.any(1), second.any(1)]  # the hidden neurons each layer keeps, whole rows and columns
        assert torch.equal(first, kept[0][:, None].expand_as(first))
        assert torch.equal(second, (kept[1][:, None] & kept[0][None, :]).expand_as(second))
        assert torch.equal(last, kept[1][None, :].expand_as(last))
        if job.startswith("prune-channel-guard"):
            assert _dump(tmp_path, "ddp-prune-channel-guard_rank0")["pruning.decisions"].any()
        elif job.startswith("prune-channel-global"):
            assert sum(int((~k).sum()) for k in kept) == 37  # exact: half of the 74 hidden neurons
        elif not job.startswith("prune-channel-macs"):
            assert [int((~k).sum()) for k in kept] == [19, 19]  # layer scope: half of each 37, a half rounded up
    assert (tmp_path / "prune-channel-ckpt" / "epoch=1.ckpt").is_dir()
