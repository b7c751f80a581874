"""How ``export_onnx`` calls a model: its example inputs as the exporter's positional arguments (keyword, nested and
structured inputs through small wrapper modules), the names of the leaves, and the errors a trace raises, said with
their fix.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import tempfile
import traceback
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized
from torch.overrides import TorchFunctionMode

from ..core.checks import first_line
from ..core.experts import is_experts
from ..core.fake_quant import FakeQuantizer
from ..core.tracing import forward_state_kept, fresh_containers, map_tensors, plain_float, without_cache
from ..core.wrappers import eager, uncompiled
from .onnx_composites import composite_ops
from .state_entries import check_traceable_state

__all__ = [
    "as_args",
    "check_names",
    "check_traceable",
    "composite_attention",
    "listed",
    "tensor_leaves",
    "trace_error",
    "tracing_call",
    "unwrapped",
]


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """The positional arguments ``example_inputs`` stands for, in containers of their own (a forward writing into
    its input dict changes these, not the example: trial GC)."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, dict):  # keyword arguments, as Lightning calls a module with a dict (another
        return (fresh_containers(example_inputs),)  # mapping, `transformers`' BatchEncoding, is one argument: trial GD)
    if isinstance(example_inputs, Mapping):
        return (fresh_containers(example_inputs),)
    if isinstance(example_inputs, Sequence):
        return tuple(fresh_containers(item) for item in example_inputs)
    raise TypeError(
        f"`example_inputs` must be a Tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}."
    )


class _Keywords(nn.Module):
    """Calls ``model(**{name: tensor}, **constants)`` from positional tensors: the tracer passes inputs positionally;
    ``constants`` (flags, ints, ``None``) are fixed in the graph."""

    def __init__(self, model: nn.Module, names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.constants = constants

    def forward(self, *tensors: Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)), **self.constants)


class _KeywordCall(nn.Module):
    """Calls ``model(**inputs)`` from one dict of keyword inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Any]) -> Any:
        return self.model(**inputs)


class _Structured(nn.Module):
    """Calls ``model(*args)`` whose positional inputs include dicts, lists or tuples of tensors, from the flat
    tensors the tracer passes (``torch.onnx.export`` would read a trailing dict as keyword arguments)."""

    def __init__(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        super().__init__()
        self.model = model
        self.template = args

    def forward(self, *tensors: Tensor) -> Any:
        return self.model(*_refill(self.template, iter(tensors)))


def tensor_leaves(value: Any, name: str) -> list[tuple[str, Tensor]]:
    """The tensors of a nested input, in order, named by their dict keys (else by position)."""
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [leaf for key, item in value.items() for leaf in tensor_leaves(item, str(key))]
    if isinstance(value, (list, tuple)):
        return [leaf for i, item in enumerate(value) for leaf in tensor_leaves(item, f"{name}_{i}")]
    return []  # other values (ints, flags, None) are constants of the graph


def _holders(value: Any, depth: int = 0) -> list[str]:
    """The type names of the objects in an example that hold tensors but are no tensor, mapping, list or tuple (a
    dataclass's fields, an object's attributes): the graph cannot take their tensors as inputs."""
    if isinstance(value, Tensor) or depth > 8:
        return []
    if isinstance(value, Mapping):
        return [n for item in value.values() for n in _holders(item, depth + 1)]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _holders(item, depth + 1)]
    return [type(value).__name__] if any(_holds_tensor(item, depth + 1) for item in _attributes(value)) else []


def _attributes(value: Any) -> list[Any]:
    """A dataclass instance's fields, another object's attributes (none for a type, a module or a function)."""
    if isinstance(value, (type, nn.Module, types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return []  # (a PyTorch Geometric `Data` is callable: it holds tensors all the same)
    if dataclasses.is_dataclass(value):
        return [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    return list(getattr(value, "__dict__", {}).values())


def _holds_tensor(value: Any, depth: int, seen: set[int] | None = None) -> bool:
    """Whether ``value`` is a tensor or holds one (in containers, fields or attributes, each object looked at once;
    PyTorch Geometric's ``Data`` keeps its tensors in a mapping it holds)."""
    if isinstance(value, Tensor):
        return True
    seen = set() if seen is None else seen
    if depth > 8 or id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = _attributes(value)
    return any(_holds_tensor(item, depth + 1, seen) for item in items)


def check_inputs_carried(example_inputs: Any) -> None:
    """Tensors held by an object in the example (trial GE: chemprop's ``BatchMolGraph``, a dataclass of the batch's
    atoms, bonds and indices) would be constants of the graph, which then computes that example only: refused where
    they are all the example holds (the export wrote a graph with no input, unsaid), said otherwise."""
    held = _holders(example_inputs)
    if not held:
        return
    pyg = any(c.__module__.startswith("torch_geometric") for v in _objects(example_inputs) for c in type(v).__mro__)
    said = (
        f"`example_inputs` holds {sorted(set(held))[:3]}: "
        "objects holding tensors, which an ONNX graph cannot take as inputs (they are tensors, in tuples, lists or "
        "dicts), so their tensors would be constants of the graph and it would compute this example only"
    )
    fix = (
        "Export a module whose forward takes those tensors ("
        + ("a PyTorch Geometric batch's `(data.x, data.edge_index, data.batch)`; " if pyg else "")
        + "a wrapper that builds the object from them and calls the model), or keep the model as the compressed "
        "file (`save_compressed`)."
    )
    plain = isinstance(example_inputs, (Tensor, Mapping, list, tuple))
    if not tensor_leaves(example_inputs if plain else (), "input"):
        raise ValueError(f"export_onnx cannot export from this example: {said}. {fix}")
    warnings.warn(f"export_onnx: {said}. {fix}", UserWarning, stacklevel=4)


def _objects(value: Any) -> list[Any]:
    """The example itself, or the items of its tuples, lists and mappings, one level down."""
    if isinstance(value, Mapping):
        return list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _refill(template: Any, tensors: Iterator[Tensor]) -> Any:
    """``template`` with its tensors, in the order :func:`tensor_leaves` lists them, taken from ``tensors``."""
    return map_tensors(template, lambda _: next(tensors))


@contextmanager
def composite_attention() -> Iterator[None]:
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run a fused kernel in eval mode without
    gradients, which has no ONNX form: the export traces their composite operations instead (restored after)."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        yield
        return
    before = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(before)


# what a tensor's metadata is read through (no value of it): attributes (their getters) and methods
_METADATA_ATTRIBUTES = frozenset(
    ["device", "dtype", "shape", "ndim", "layout", "requires_grad", "is_leaf", "grad_fn", "names", "itemsize",
     "nbytes", "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized"]
)  # fmt: skip
_METADATA_METHODS = frozenset(
    ["size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device", "is_floating_point",
     "is_complex", "is_contiguous", "stride", "storage_offset", "data_ptr"]
)  # fmt: skip


def _metadata(func: Any) -> bool:
    """Whether ``func`` reads only a tensor's metadata (its device, dtype, sizes), not its values."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # an attribute's getter: named by its descriptor
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_ATTRIBUTES
    return name in _METADATA_METHODS


class _Reads(TorchFunctionMode):
    """Records the ids of the tensors every torch function called meanwhile is given (nested in lists and dicts)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if _metadata(func):  # trial FX: scvi's `{p.device for p in self.parameters()}` counted a whole VAE as read
            return func(*args, **(kwargs or {}))
        stack: list[Any] = [args, kwargs or {}]
        while stack:
            value = stack.pop()
            if isinstance(value, Tensor):
                self.seen.add(id(value))
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
            elif isinstance(value, Mapping):
                stack.extend(value.values())
        return func(*args, **(kwargs or {}))


@contextmanager
def unread_entries(model: nn.Module) -> Iterator[list[str]]:
    """Meanwhile, the modules of ``model`` called and the torch functions called are watched; afterwards the list
    holds the state dict entries of the modules neither called nor read from, none of their own parameters or
    buffers given to a torch function (an ONNX graph of a GAN's generator: the discriminator's; a module whose weight
    another reads, as ``nn.MultiheadAttention``'s ``out_proj``, is read; one whose forward uses constants made from
    its weight, as in an export, is called). A module counts whole: BatchNorm's ``num_batches_tracked``, read in
    training only, goes with its statistics. The fake quantizers' tensors are not listed (no baseline counts them)."""
    reads = _Reads()
    unread: list[str] = []
    called: set[int] = set()
    scripted = {id(m) for s in model.modules() if isinstance(s, torch.jit.ScriptModule) for m in s.modules()}
    handles = [  # a scripted module takes no hook (trial ER) and runs unseen: it counts as called
        m.register_forward_pre_hook(lambda module, _args: called.add(id(module)))
        for m in model.modules()
        if id(m) not in scripted
        and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))
    ]
    called.update(scripted)
    try:
        with reads:
            yield unread
    finally:
        for handle in handles:
            handle.remove()
    for name, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not own or id(module) in called or isinstance(module, FakeQuantizer):
            continue
        if not any(id(t) in reads.seen for _, t in own):
            unread.extend(f"{name}.{key}" if name else key for key, _ in own)
    state = model.state_dict(keep_vars=True)
    unread[:] = [key for key in unread if key in state]


def tracing_call(
    model: nn.Module, example_inputs: Any
) -> tuple[nn.Module, tuple[Any, ...], list[str], list[str] | None]:
    """What the tracer calls and with what: the module (``model``, or one that passes keyword or nested inputs), its
    positional tensors, the example's keyword inputs that hold tensors (the graph's inputs, in order; trial BV: a
    flag among them gave the tracer's message), and the names of a nested input's tensors (``None`` otherwise)."""
    if isinstance(example_inputs, dict):
        keys = [k for k, v in example_inputs.items() if tensor_leaves(v, "")]
        if all(isinstance(example_inputs[k], Tensor) for k in keys):
            constants = {k: v for k, v in example_inputs.items() if k not in keys}
            return _Keywords(model, keys, constants), tuple(example_inputs[k] for k in keys), keys, None
        # a value holding several tensors (a tuple, a dict): each tensor one input, named by its keys (trial CA: a
        # trailing dict was read as the tracer's keyword arguments, a tuple became one misnamed input)
        template = (fresh_containers(dict(example_inputs)),)
        leaves = tensor_leaves(template, "input")
        unique = len({n for n, _ in leaves}) == len(leaves)
        names = [n for n, _ in leaves] if unique else [f"input_{i}" for i in range(len(leaves))]
        return _Structured(_KeywordCall(model), template), tuple(t for _, t in leaves), [], names
    args = as_args(example_inputs)
    if all(isinstance(a, Tensor) for a in args):
        # the tracer passes a keyword-only parameter's default as one more positional input: called through a
        # module that passes the tensors only (trial DB: `forward(self, x, *, scale=1.0)` gave a bare TypeError)
        return (_Structured(model, args) if _has_keyword_only(model) else model), args, [], None
    leaves = tensor_leaves(args, "input")  # e.g. forward(batch: dict)
    unique = len({n for n, _ in leaves}) == len(leaves)
    names = [n for n, _ in leaves] if unique else [f"input_{i}" for i in range(len(leaves))]
    return _Structured(model, args), tuple(t for _, t in leaves), [], names


def _has_keyword_only(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature: traced as it is
        return False
    return any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def trace_error(err: Exception, model: nn.Module, example_inputs: Any, opset: int) -> ValueError:
    """The exporter's error (an operator it lacks, a SymbolicValueError) or the model's, said with what to change."""
    if "onnx_opset_version" in str(err):
        return ValueError(
            f"`opset`={opset} is newer than this torch's ONNX exporter supports ({err}); try 17 (the default)."
        )
    if "dynamo-optimized" in str(err):
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: it runs code compiled by `torch.compile` (a "
            "compiled function it calls), which the ONNX tracer cannot enter. "
            "Export the model before compiling it, or an uncompiled instance given its weights "
            "(`load_state_dict`)."
        )
    constant = re.search(r"output (\d+) \(.*did not have observable data dependence", str(err), re.DOTALL)
    if constant:  # trial DK: "output 1 (3 What to change: replace that operation", the number cut at a line break
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: output {constant.group(1)} of its forward (flattened, "
            "from 0) does not depend on the inputs: a Python number or a constant it returns. An ONNX graph computes "
            "its outputs from its inputs: return only tensors computed from them (drop the constant, or export a "
            "module that returns the tensors alone)."
        )
    experts = [name for name, module in model.named_modules() if is_experts(module)]
    if "histc" in str(err) and experts:  # trial EQ: gpt-oss, Qwen3-MoE and DeepSeek-V3 were told to pass a mask
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: the mixture of experts in {experts[:2]} counts the "
            "tokens of each expert with `torch.histc` (`transformers`' grouped experts), which the ONNX exporter "
            "lacks. The eager experts (`model.set_experts_implementation('eager')` on the `transformers` model) "
            "trace, but their loop over the experts the example's tokens reach is fixed in the graph, which then "
            "fails on inputs that leave one of those experts without a token (a trial: one sequence of one repeated "
            "token). What to change: keep the model as the compressed file (`save_compressed`), which reloads it "
            "whole; or export the eager experts for large batches only."
        )
    # the first line only: a SymbolicValueError goes on with a dump of the TorchScript graph (a trial: 1,588
    # characters), which the chained exception still holds
    first = first_line(err)
    first = first if len(first) <= 300 else first[:300] + " ..."
    if "is not part of the active trace" in first:  # trial FB: told to replace an operation or try a newer opset
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: it calls a submodule compiled by `torch.jit.script`, "
            "which the ONNX tracer cannot enter. What to change: export a model whose submodules are not scripted "
            "(script it after exporting), or keep the model as the compressed file (`save_compressed`)."
        )
    if re.search(r"aten::(polar|view_as_complex|view_as_real|complex)\b", first):
        # trial EW: Llama4's rotary embedding, given its mask, was told to pass the mask
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: {first} ONNX has no complex numbers, and the forward "
            "computes with them (a rotary embedding as a complex rotation, `torch.polar` / `torch.view_as_complex`, "
            "as `transformers`' Llama4 does). What to change: rotate with `cos` and `sin` of real tensors in the "
            "model's forward; or keep the model as the compressed file (`save_compressed`), which reloads it whole."
        )
    if "unknown batch size" in str(err):  # trial FQ: an InstanceNorm with running statistics was told to be replaced
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: {first_line(err, 200)} The exporter converts this "
            "operation only for a fixed batch, and export_onnx makes dimension 0 of every input and output dynamic. "
            "What to change: give `dynamic_axes` a static batch for every input and output, e.g. "
            "`{'input_0': {0: None}, 'output_0': {0: None}}` (the graph then takes the example's batch size only)."
        )
    backward = re.search(r"aten::\w+_backward\b", str(err))
    if backward or "requires grad as a constant" in str(err):  # trial GD: a force field's `silu_backward` was
        return ValueError(  # blamed on the forward's own operations
            f"export_onnx cannot trace {type(model).__name__}: "
            + (
                "its forward takes a derivative (`torch.autograd.grad`, as a force field's forces"
                if backward
                else "a tensor that requires grad reaches the graph as a constant (a derivative the forward takes "
                "with `torch.autograd.grad`, as a force field's forces, or a tensor computed from the weights and "
                "kept"
            )
            + f"; {first_line(err, 160)}), and an ONNX graph holds no derivative. What to change: export the module "
            "whose output the forward differentiates (the energy model) and take the derivative outside the graph; "
            "or keep the model as the compressed file (`save_compressed`)."
        )
    carried = re.search(r"received an input of unsupported type: (\w+)", str(err))
    if carried:  # trial FN: a gpytorch model's MultivariateNormal was called an input and blamed on an operation
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: its forward returns (or is given) a "
            f"{carried.group(1)}, which an ONNX graph cannot carry: its inputs and outputs are tensors (in tuples, "
            "lists or dicts). What to change: export a module whose forward returns the tensors you need (e.g. a "
            "wrapper returning a distribution's `mean`), or keep the model as the compressed file (`save_compressed`)."
        )
    if not _raised_converting(err):
        # the model's own error under the tracer, the forward having run on these inputs (trial FM: Nystromformer's
        # shape error was answered with "pass `attention_mask`", which failed the same way)
        return ValueError(
            f"export_onnx cannot trace {type(model).__name__}: its forward runs on these inputs, but fails under "
            f"torch's tracer ({first.rstrip('.')}): a step of it depends on sizes or values the tracer records as "
            "constants, or on Python state the trace changes (`torch.jit.trace(model, inputs)` fails the same way "
            "and shows where). What to change: make that step traceable in the model's forward; or keep the model as "
            "the compressed file (`save_compressed`), which reloads it whole."
        )
    parametrized = [n for n, m in model.named_modules() if is_parametrized(m)]
    where = (  # trial DK: an operator of spectral_norm's / orthogonal's parametrization was blamed on the forward
        f"replace that operation in the model's forward, or in the parametrizations of {parametrized[:3]}, which run "
        "in it (`torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')` keeps their current weight)"
        if parametrized
        else "replace that operation in the model's forward"
    )
    # torch names the opset that added an operator; one no opset has (trial FI: TabM's `aten::column_stack`) was
    # said to be perhaps in a newer one, and opsets 18 and 20 failed the same way
    added = re.search(r"was added in version (\d+)", str(err))
    if added:
        opsets = f" (opset {added.group(1)} has it: `export_onnx(..., opset={added.group(1)})`)"
    elif re.search(r"to ONNX opset version \d+ is not supported", first):
        opsets = (
            " (no opset of torch's ONNX exporter converts it on the TorchScript path `export_onnx` runs: rewrite it "
            "with operations that export, or register a symbolic for it with `torch.onnx.register_custom_op_symbolic`)"
        )
    else:
        opsets = ""
    return ValueError(
        f"export_onnx cannot trace {type(model).__name__}: {first} What to change: "
        f"{_trace_hint(example_inputs, model)}{where}{opsets}."
    )


def check_traceable(model: nn.Module, example_inputs: Any, opset: int = 17) -> None:
    """Raise the ``ValueError`` :func:`export_onnx` would raise for an operation the ONNX exporter cannot convert,
    without writing a file: the model's own graph is traced (fake quantization off), without its weights
    (``export_params=False``) and into a scratch file, so it costs one forward and the graph's conversion. The callbacks
    run it at ``setup`` for an ONNX ``export_path`` (trial BY: a Llama whose example held no attention mask
    trained to the end, then failed to export)."""
    with uncompiled(unwrapped(model)) as plain, forward_state_kept(plain, parameters=False):  # as export_onnx does
        _check_traceable(plain, example_inputs, opset)


def check_batched(tensors: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse a 0-d tensor among the graph's inputs: the export declares dimension 0 of every input the batch (trial
    ES: a diffusion UNet's timestep `torch.tensor(500)` failed after the fit, blamed on an operation of the forward)."""
    scalars = [name for name, t in zip(names, tensors, strict=False) if isinstance(t, Tensor) and t.dim() == 0]
    if scalars:
        raise ValueError(
            f"`example_inputs` holds 0-d tensors ({scalars}): the ONNX graph takes dimension 0 of every input as the "
            "batch. Give each one a batch dimension (a timestep per sample: `t.expand(batch)`, with the forward "
            "taking a tensor of shape (batch,)), or pass it as a Python number, a constant of the graph."
        )


def _check_traceable(model: nn.Module, example_inputs: Any, opset: int) -> None:
    check_traceable_state(model)
    check_inputs_carried(example_inputs)
    traced_model, traced_args, keys, leaf_names = tracing_call(model, example_inputs)
    check_batched(traced_args, keys or leaf_names or [f"input_{i}" for i in range(len(traced_args))])
    with (
        plain_float(model),  # the model's own operations: the quantizers' export forms are this package's
        eager(model),
        without_cache(model),
        torch.no_grad(),
        composite_attention(),
        composite_ops(),
        warnings.catch_warnings(),
        tempfile.TemporaryDirectory() as scratch,
    ):
        warnings.simplefilter("ignore")  # the tracer's warnings are for the export itself
        try:
            torch.onnx.export(
                traced_model, fresh_containers(traced_args), str(Path(scratch) / "graph.onnx"), opset_version=opset,
                export_params=False, do_constant_folding=False, dynamo=False,
            )  # fmt: skip
        except (RuntimeError, AssertionError) as err:  # a symbolic's assertion too (trial EQ: GLM-4's `cat`)
            raise trace_error(err, model, example_inputs, opset) from err


def _raised_converting(err: BaseException) -> bool:
    """Whether the exporter raised ``err`` converting the traced graph (an operator it lacks, an unsupported case of
    one), not the model's forward while it was traced: the innermost frame is the exporter's, or the message names
    an operator or opset."""
    frames = [frame.f_code.co_filename.replace("\\", "/") for frame, _ in traceback.walk_tb(err.__traceback__)]
    if frames and "/torch/onnx/" in frames[-1]:
        return True
    return re.search(r"onnx|opset|aten::|prim::|symbolic", str(err), re.IGNORECASE) is not None


def _trace_hint(example_inputs: Any, model: nn.Module) -> str:
    """For ``transformers`` models given ids without their mask: pass the mask (the one a model builds itself uses
    operators the exporter lacks); nothing to add otherwise."""
    if not isinstance(example_inputs, dict):
        # a transformers PreTrainedModel called with a bare tensor, itself or inside the model (a LightningModule
        # that wraps one: a trial's export_path was told to replace an operator of the model's forward)
        names = (getattr(m, "main_input_name", None) for m in model.modules())
        main = next((n for n in names if isinstance(n, str) and n in ("input_ids", "input_features")), None)
        tensors = len(tensor_leaves(example_inputs, "input"))
        if main is not None and not _takes_keyword(model, main) and tensors == 1:  # a wrapper given the ids alone
            return (
                "the `transformers` model inside builds a missing attention mask with operators the exporter lacks: "
                f"give {type(model).__name__}.forward the mask and pass it to the model inside, then pass both in "
                "`example_inputs`; otherwise "
            )
        if main is not None and tensors == 1:
            return (
                f"pass a dict with `{main}` and its mask (`attention_mask`, or `decoder_attention_mask` for an "
                "encoder-decoder) as `example_inputs` (a `transformers` model builds the missing mask with operators "
                "the exporter lacks); otherwise "
            )
        if main is not None:  # several tensors, the mask among them (trial DL: a wrapper given both, failing on
            return (  # an MoE router's `histc`, was told to give its forward the mask)
                "if the `transformers` model inside is called without its attention mask, pass it the mask (the one "
                "it builds uses operators the exporter lacks); otherwise "
            )
        return ""
    missing = [
        mask
        for ids, mask in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask"))
        if ids in example_inputs and mask not in example_inputs
    ]
    encoder_decoder = any(
        getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in model.modules()
    )
    if encoder_decoder and "input_features" in example_inputs and "decoder_attention_mask" not in example_inputs:
        # an encoder-decoder on audio (Whisper) builds the decoder's mask (trial FT: UnivNet, a vocoder, was told too)
        missing.append("decoder_attention_mask")
    if not missing:
        return ""
    said = " and ".join(f"`{m}`" for m in dict.fromkeys(missing))
    if all(_takes_keyword(model, m) for m in missing):
        how = f"pass {said} in `example_inputs`"
    else:  # trial DL: a wrapper whose forward lacks the argument was told to pass it, and then failed on it
        how = f"give {type(model).__name__}.forward {said}, pass it to the model inside and in `example_inputs`"
    return f"{how} (a `transformers` model builds the missing mask with operators the exporter lacks); otherwise "


def _takes_keyword(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward accepts ``name`` as a keyword (or any keyword)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def listed(value: object, argument: str) -> list[Any]:
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"`{argument}` must be a list of strings or None, got {value!r}.") from None


def check_names(
    inputs: list[str], outputs: list[str], n_in: int, n_out: int, dynamic_axes: Mapping[str, Any] | None
) -> None:
    """The graph's input and output names against what the model takes and returns, before tracing."""
    if len(inputs) != n_in:
        raise ValueError(f"`input_names` names {len(inputs)} inputs ({inputs}); the model is traced with {n_in}.")
    if len(outputs) > n_out:
        raise ValueError(f"`output_names` names {len(outputs)} outputs ({outputs}); the model returns {n_out}.")
    unknown = sorted(set(dynamic_axes or {}) - set(inputs) - set(outputs))
    if unknown:
        raise ValueError(
            f"`dynamic_axes` names {unknown}, which are not among the inputs {inputs} or outputs {outputs}."
        )


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a Lightning Fabric wrapper holds (its forward runs the model under the precision's autocast: a
    trial's `bf16-mixed` export wrote a bfloat16 graph onnxruntime refuses), else ``model``. Only Fabric's own
    wrapper: a plain model whose state dict names an inner module's is exported whole."""
    from lightning.fabric.wrappers import is_wrapped

    inner = getattr(model, "module", None)
    return inner if is_wrapped(model) and isinstance(inner, nn.Module) else model
