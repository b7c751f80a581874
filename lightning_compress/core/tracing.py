"""Calling a model the way Lightning does, and running it as a plain float model for tracing."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .layers import linear_like_types, restore_training
from .qat import quantizers

__all__ = [
    "TracerForward",
    "buffers_kept",
    "call_model",
    "check_example_inputs",
    "eval_mode",
    "forward_state_kept",
    "has_float_tensor",
    "jittered",
    "noisy_checks",
    "out_of_place",
    "output_tensors",
    "parameters_kept",
    "plain_float",
    "quiet_norm_widths",
    "seeded",
    "without_cache",
]


@contextlib.contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` meanwhile on every ``transformers`` config in ``model`` (a model wrapped in a
    LightningModule has its config one level down), so that it returns outputs, not caches; restored after."""
    cached: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if id(config) not in cached and getattr(config, "use_cache", None):
            cached[id(config)] = config
    for config in cached.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in cached.values():
            config.use_cache = True


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to each tensor in it, its containers rebuilt in their types: dicts, lists, tuples,
    namedtuples (trial GD: rebuilt from one iterable, they failed), and other mappings (``transformers``'
    ``BatchEncoding``: copied, then given the new items); anything else as it is."""
    if isinstance(value, Tensor):
        return fn(value)
    kind = type(value)
    if kind is dict or kind is OrderedDict:
        return kind((key, map_tensors(item, fn)) for key, item in value.items())
    if isinstance(value, MutableMapping):
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = map_tensors(item, fn)
        return copied
    if isinstance(value, Mapping):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, list):
        return [map_tensors(item, fn) for item in value]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return kind(*(map_tensors(item, fn) for item in value))
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    return value


def _fresh(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().requires_grad_(tensor.requires_grad)


def fresh_containers(value: Any) -> Any:
    """``value`` rebuilt (:func:`map_tensors`) with copies of its tensors: what a forward writes into its inputs stays
    in the copy (trial GC: schnetpack's models add keys to their input dict and cast its values to float64 in eval
    mode, and the next of the package's calls on the example failed on mixed dtypes; trial GD: a forward scaling its
    input in place was taken for one drawing random numbers, and the caller's example was scaled 128 times)."""
    return map_tensors(value, _fresh)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way Lightning calls it with ``example_input_array``, with caches off, on fresh containers
    (:func:`fresh_containers`)."""
    inputs = fresh_containers(inputs)
    with without_cache(model):
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode; each module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        restore_training(modes)


class _SameCall(nn.Module):
    """Calls ``wrapped`` as it would be called, and compares as a plain module: a stand-in while a tracer that compares
    modules with ``==`` runs (``wrapped`` is kept out of the module tree)."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", wrapped)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return object.__getattribute__(self, "wrapped")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """What the forward reads of the module it stands for (trial FF: pytorch-forecasting reads
        ``self.loss.rescale_parameters`` of its loss, a torchmetrics Metric, and no channel could be traced)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)


@contextlib.contextmanager
def comparable_modules(model: nn.Module) -> Iterator[None]:
    """Submodules whose class overrides ``==`` are replaced by stand-ins that call them the same way until the block
    ends: Torch-Pruning finds modules in lists with ``==``, and a torchmetrics ``Metric`` answers ``==`` with a
    metric, which is always true (a trial: a metric on a GPT-2's LightningModule made every Linear and Conv1D read as
    ignored, and no MLP neuron was pruned). Every name of a module registered twice is replaced; what they hold is
    left as it is (its parameters are outside the trace, as a metric's are)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stand_ins: dict[int, nn.Module] = {}
    replaced: list[str] = []
    for name, child in model.named_modules(remove_duplicate=False):
        if not name or type(child).__eq__ is nn.Module.__eq__ or any(name.startswith(f"{r}.") for r in replaced):
            continue
        parent_name, _, attr = name.rpartition(".")
        swapped.append((model.get_submodule(parent_name), attr, child))
        replaced.append(name)
    for parent, attr, child in swapped:
        setattr(parent, attr, stand_ins.setdefault(id(child), _SameCall(child)))
    try:
        yield
    finally:
        for parent, attr, child in reversed(swapped):
            setattr(parent, attr, child)


@contextlib.contextmanager
def all_tracked(model: nn.Module) -> Iterator[None]:
    """Every floating-point parameter requires grad until the block ends: a graph traced through autograd sees a
    frozen layer too (a trial: a frozen first layer was "never called as a module" and left whole)."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


@contextlib.contextmanager
def plain_float(model: nn.Module) -> Iterator[None]:
    """The float data flow in eval mode: fake quantizers off; everything restored afterwards."""
    saved = []
    for _, q in quantizers(model):
        saved.append((q, q.fake_quant_enabled, q.observer_enabled))
        q.fake_quant_enabled = False
        q.observer_enabled = False
    try:
        with eval_mode(model):
            yield
    finally:
        for q, fq, ob in saved:
            q.fake_quant_enabled = fq
            q.observer_enabled = ob


@contextlib.contextmanager
def forward_state_kept(model: nn.Module, parameters: bool = True) -> Iterator[None]:
    """Tensors this package's own forwards (traces, probes, checks) leave in ``model``'s modules' attributes that held
    ``None`` are taken back: a cache filled on the first input it sees would keep the example's (trial FE: PyG's
    ``GCNConv(cached=True)`` kept the 50-node example graph's edges after ``prune_``, and every later forward on the
    full graph was wrong, unsaid; a fit's validation accuracy fell to 0.13). In a module where one is taken back, so
    are the other attributes that held ``None``, whatever they hold now: a cache's bookkeeping goes with it (trial FK:
    fair-esm's rotary embedding keeps the cached length as an int beside its cos/sin tables; with the tables taken
    back alone, every later forward of ESM-2 failed). A module that filled no tensor keeps what its forward set
    (``transformers`` marks the output hooks it installs on the first forward), and so do submodules.

    With ``parameters`` (not for exporters, which trace the operations themselves), the values of Parameters and
    buffers the forwards write into are put back too (:func:`parameters_kept`), and so are torch's random
    generators: a refused setup leaves the model as it was (trial FN: gpytorch initializes its variational parameters
    on the first forward it sees, and the trace of a refused channel setup had filled them, from the global random
    state, with the example's)."""
    empty = [(m, [k for k, v in vars(m).items() if v is None]) for m in model.modules()]
    with contextlib.ExitStack() as stack:
        if parameters:
            stack.enter_context(seeded(model, None))
            stack.enter_context(parameters_kept(model))
        try:
            yield
        finally:
            for module, keys in empty:
                now = vars(module)
                if any(_holds_tensor(now.get(key)) for key in keys):
                    for key in keys:
                        if key in now:
                            now[key] = None


def _storage(tensor: Tensor) -> int | None:
    """Where ``tensor``'s data lives (``None``: nowhere this process can write, e.g. a sharded DTensor, meta)."""
    if type(tensor) not in (Tensor, nn.Parameter, nn.Buffer) or tensor.device.type == "meta":
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _FirstWritesSaved(TorchDispatchMode):
    """Saves a copy of each watched tensor the first time an operation writes into its storage."""

    def __init__(self, watched: dict[int, list[Tensor]]) -> None:
        super().__init__()
        self.watched = watched
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        norm = "batch_norm" in schema.name  # writes its running statistics, which its schema does not mark (CPU)
        if schema.is_mutable or norm:
            for index, argument in enumerate(schema.arguments):
                written = argument.alias_info is not None and argument.alias_info.is_write
                if not written and not (norm and argument.name in ("running_mean", "running_var")):
                    continue
                value = args[index] if index < len(args) else kwargs.get(argument.name)
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    where = _storage(tensor) if isinstance(tensor, Tensor) else None
                    if where is not None and where in self.watched:
                        self.saved.extend((t, t.detach().clone()) for t in self.watched.pop(where))
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_kept(model: nn.Module) -> Iterator[None]:
    """Meanwhile, a Parameter or buffer of ``model`` an operation writes into in place (a lazy initialization, a
    running statistic, an observer) is copied first; every one written is put back afterwards. Nothing is copied
    for a forward that writes none."""
    watched: dict[int, list[Tensor]] = {}
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        where = _storage(tensor)
        if where is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            watched.setdefault(where, []).append(tensor)
    if not watched:
        yield
        return
    mode = _FirstWritesSaved(watched)
    try:
        with mode:
            yield
    finally:
        with torch.no_grad():
            for tensor, value in mode.saved:
                tensor.copy_(value)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """``model``'s buffers as they are now, put back afterwards where something changed them (a call counter, a
    running statistic a forward updates in eval mode): for forwards that run under another tracer, where
    :func:`parameters_kept`'s dispatch mode cannot (the ONNX exporter's). Not the fake quantizers' state, which an
    export sets consistently (a weight's scale read from the weight, with its shape and flags): put back in part, a
    quantizer computed with a scale its flags disowned. Costs a copy of the buffers."""
    own = {id(b) for _, quantizer in quantizers(model) for b in quantizer.buffers()}
    saved = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in own and _storage(b) is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if buffer.shape == value.shape and not torch.equal(buffer, value):
                    buffer.copy_(value)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, Tensor) or type(value).__name__ == "SparseTensor"  # torch_sparse's, PyG's adjacency


@contextlib.contextmanager
def quiet_norm_widths() -> Iterator[None]:
    """Meanwhile, torch's warning that an InstanceNorm without affine weights or running statistics sees another width
    than its ``num_features`` is not shown: such a norm holds nothing to cut, and the channel checks' forwards of cut
    copies (and compact's, before it sets the width) make it (MONAI's UNETR: a warning per norm)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="input's size at dim=1 does not match num_features")
        yield


@contextlib.contextmanager
def out_of_place(model: nn.Module) -> Iterator[None]:
    """Modules that can compute in place (``nn.ReLU(inplace=True)``, ``nn.LeakyReLU``, ``nn.Dropout``, ...) compute out
    of place meanwhile; put back afterwards. An in-place activation after a norm that reshapes internally (an
    InstanceNorm) rewrites the graph the dependency tracer reads, and the norm fell out of its group (trial FC:
    MONAI's DynUNet, InstanceNorm then an in-place LeakyReLU, had its groups refused)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for module in changed:
        cast(Any, module).inplace = False
    try:
        yield
    finally:
        for module in changed:
            cast(Any, module).inplace = True


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int | None = 0) -> Iterator[Callable[[], bool]]:
    """Meanwhile, torch's generators of the CPU and of ``model``'s CUDA devices start from ``seed`` (``None``: as
    they are); put back afterwards. Two forwards compared (a model with channels zeroed, then removed) draw the
    same random numbers: a VAE's ``torch.randn_like`` made every channel group look unfaithful (trial EP). Yields a
    function that says whether anything drew from those generators since they were set."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})

    def states() -> list[Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(i) for i in devices)]

    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        start = states()
        yield lambda: any(not torch.equal(a, b) for a, b in zip(start, states(), strict=True))


def check_example_inputs(
    model: nn.Module, example_inputs: Any, argument: str = "example_inputs", why: str = ""
) -> None:
    """Run ``model`` once on ``example_inputs`` (float, eval mode, no gradients) before anything traces it: inputs
    its ``forward`` does not take fail here with a ``ValueError`` naming ``argument``, not deep inside a tracer.

    ``why``: what the inputs are for, put before the message (e.g. the export path)."""
    try:
        with torch.no_grad(), plain_float(model), forward_state_kept(model):
            call_model(model, example_inputs)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        if _runs_with_gradients(model, example_inputs, err):
            raise ValueError(
                f"{why}{type(model).__name__}'s forward runs on `{argument}` only with gradients on: it differentiates "
                f"inside (`torch.autograd.grad`, as a force field's forces; without gradients: {first}). The channel "
                "trace, `compact` and `export_onnx` run the forward without gradients, and an ONNX graph holds no "
                "derivative: prune channels of (or export) a module whose forward returns what is differentiated (the "
                "energy model inside), or prune weights (`granularity='element'`) and quantize, which trace nothing."
            ) from err
        raise ValueError(
            f"{why}`{argument}` does not run through {type(model).__name__}'s forward ({type(err).__name__}: "
            f"{first}): pass what `forward` takes, with the shapes it expects (a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs)."
        ) from err


def _runs_with_gradients(model: nn.Module, example_inputs: Any, err: Exception) -> bool:
    """Whether ``err`` came from a derivative taken inside the forward without gradients (``torch.autograd.grad`` of
    a tensor with no ``grad_fn``), and the forward runs with them (trial GC: schnetpack's forces; the example was
    blamed)."""
    if not isinstance(err, RuntimeError) or "does not require grad" not in str(err):
        return False
    try:
        with torch.enable_grad(), plain_float(model), forward_state_kept(model):
            call_model(model, example_inputs)
    except Exception:
        return False
    return True


def _items(value: Any) -> list[Any] | None:
    """What a container in a model's output holds: a dict's values (``ModelOutput`` too), a tuple's or list's items, a
    dataclass instance's fields (darts' ``PLModuleOutput``, trial FU: channel pruning saw no output, and blamed every
    layer); ``None`` for a leaf."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (tuple, list)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, field.name) for field in dataclasses.fields(value)]
    return None


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model's output (nested tuples, lists, dicts, ``ModelOutput``s and dataclasses)."""
    flat: list[Tensor] = []
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            flat.append(item)
        else:
            stack.extend(_items(item) or [])
    return flat


def call_model_for_tracer(model: nn.Module, inputs: Any) -> Any:
    """:func:`call_model`, with an output that holds anything but tensors (nanoGPT's ``(logits, None)`` without
    targets, a dict with ``"loss": None``) reduced to the tuple of its tensors: a tracer that walks the output
    (Torch-Pruning's) iterates every item (trial EN: ``'NoneType' object is not iterable``, no channel pruned)."""
    out = call_model(model, inputs)
    tensors = output_tensors(out)
    return out if _leaves(out) == len(tensors) and _walkable(out) else tuple(reversed(tensors))


class _TracedTuple(tuple):
    """A tuple a layer returned, with the ``shape`` of its first item (a tracer reads a layer's output shape)."""

    @property
    def shape(self) -> torch.Size:
        return cast(Tensor, self[0]).shape


class TracerForward:
    """The ``forward_fn`` handed to a tracer that hooks the model's layers itself (Torch-Pruning's): it calls
    :func:`call_model_for_tracer`, and a forward that raises, in the model or in the tracer's own hooks, returns a
    placeholder instead, so that the tracer removes the hooks it registered (trial EW: Llama4's router, an
    ``nn.Linear`` returning a tuple, broke Torch-Pruning's hook; its 17 hooks stayed on the model and every later
    forward, a plain ``fit`` too, failed the same way). :meth:`reraise` then raises what the forward raised.

    Its own hooks on the layers the tracer hooks (Linear, Conv, norms, embeddings; run before the tracer's, removed
    before it returns) hand the tracer a plain tuple such a layer returns as a :class:`_TracedTuple`, which has its
    first tensor's ``shape``: Torch-Pruning reads a Linear's output shape, then follows a tuple's first item, so a
    router returning ``(logits, weights)`` is traced as a layer (trial EY: left out of the trace, the layers feeding it
    were left whole, and a concatenation of its weights failed the whole trace). Any other output that is no tensor
    (a dict, a named tuple, a dataclass) is recorded in ``non_tensor_layers``, each with its type, so that the tracer
    can be told to leave them out.

    It also records the sizes of every concatenation's inputs along its dimension (``concat_sizes``, by the output's
    ``grad_fn``, which the tracer's nodes hold; only inputs with a gradient history, which the tracer sees): where the
    tracer cannot infer them itself, they are measured."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.non_tensor_layers: list[tuple[nn.Module, str]] = []
        self.concat_sizes: dict[Any, list[int]] = {}
        self.called: set[int] = set()  # ids of the hooked layers the forward called

    def __call__(self, model: nn.Module, inputs: Any) -> Any:
        def record(module: nn.Module, _args: Any, out: Any) -> Any:
            self.called.add(id(module))
            if isinstance(out, Tensor):
                return None
            if type(out) is tuple and out and isinstance(out[0], Tensor):
                return _TracedTuple(out)  # the same items to the forward that reads them
            if all(module is not m for m, _ in self.non_tensor_layers):
                self.non_tensor_layers.append((module, type(out).__name__))
            return None

        traced = (*linear_like_types(), nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
        hooks = [m.register_forward_hook(record, prepend=True) for m in model.modules() if isinstance(m, traced)]
        try:
            with _Concatenations(self.concat_sizes):
                return call_model_for_tracer(model, inputs)
        except Exception as err:
            self.failure = err
            return torch.zeros((), requires_grad=True)
        finally:
            for handle in hooks:
                handle.remove()

    def reraise(self) -> None:
        """Raise what the forward raised, if it did."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure


_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)


class _Concatenations(torch.overrides.TorchFunctionMode):
    """Meanwhile, the sizes of each concatenation's inputs along its dimension, by the output's ``grad_fn``."""

    def __init__(self, sizes: dict[Any, list[int]]) -> None:
        super().__init__()
        self.sizes = sizes

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONCATENATIONS and isinstance(out, Tensor) and out.grad_fn is not None and out.dim():
            parts = args[0] if args else kwargs.get("tensors", ())
            dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
            if isinstance(dim, int):  # the inputs a tracer sees: those with a gradient history
                dim %= out.dim()
                self.sizes[out.grad_fn] = [
                    int(t.shape[dim]) for t in parts if isinstance(t, Tensor) and t.requires_grad
                ]
        return out


def _leaves(out: Any) -> int:
    """How many leaves a model's output has (tensors or anything else), counted as :func:`output_tensors` walks it."""
    count, stack = 0, [out]
    while stack:
        items = _items(stack.pop())
        if items is None:
            count += 1
        else:
            stack.extend(items)
    return count


def _walkable(out: Any) -> bool:
    """Whether a tracer that walks tuples, lists and dicts reaches every container in ``out`` (not a dataclass)."""
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif _items(item) is not None:
            return False
    return True


def jittered(inputs: Any, seed: int = 0) -> Any:
    """``inputs`` with random noise of each floating-point tensor's spread added (a standard normal where the tensor
    is constant, e.g. an all-zero ``example_input_array``); other values as they are, the structure the same.

    Two models compared on the example inputs alone can agree only because zeros hide a difference (a network
    without biases maps zeros to zeros). The noise comes from its own generator: the global random state is not
    touched."""
    generator = torch.Generator().manual_seed(seed)

    def noisy(value: Tensor) -> Tensor:
        if not value.is_floating_point():
            return value
        spread = float(value.detach().float().std()) if value.numel() > 1 else 0.0
        if not math.isfinite(spread) or spread == 0.0:
            spread = 1.0
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * spread
        return value.detach() + noise.to(device=value.device, dtype=value.dtype)

    return map_tensors(inputs, noisy)


def noisy_checks(inputs: Any, runs: Callable[[Any], object]) -> list[Any]:
    """The inputs to compare two models on: ``[inputs]``, and :func:`jittered` ones after it where ``inputs`` hold a
    floating-point tensor and ``runs`` (a forward of the model) accepts them. A model that turns floats into
    indices (``(x * 16).round().long()`` into an embedding) can fail on noise (trial EQ: ModernBERT on digits'
    pixels); it is then compared on its own inputs alone."""
    if not has_float_tensor(inputs):
        return [inputs]
    noisy = jittered(inputs)
    try:
        runs(noisy)
    except Exception:
        return [inputs]
    return [inputs, noisy]


def like_model(inputs: Any, model: nn.Module) -> Any:
    """``inputs`` (a tensor, or nested tuples, lists and dicts) with floating-point tensors in ``model``'s
    floating-point dtype and every tensor on its device: a bfloat16 or float16 model (``precision="bf16-true"``,
    ``"16-true"``) with a float32 ``example_input_array`` (trials: ``load_compressed`` refused a genuine file, and
    ``compact()`` called the inputs wrong)."""
    weight = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if weight is None:
        return inputs
    return map_tensors(inputs, lambda t: t.to(weight.device, weight.dtype if t.is_floating_point() else t.dtype))


def has_float_tensor(inputs: Any) -> bool:
    """Whether ``inputs`` (a tensor, or nested tuples, lists and dicts) holds a floating-point tensor."""
    if isinstance(inputs, Tensor):
        return inputs.is_floating_point()
    if isinstance(inputs, dict):
        return any(has_float_tensor(v) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return any(has_float_tensor(v) for v in inputs)
    return False
