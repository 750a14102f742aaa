"""Model registry and the :class:`SegmentationModel` base class every method derives from.

Models are built by name with keyword arguments from the config::

    model = build_model("omniseg", num_tissues=len(table), width=32)
    again = build_model(**model.config())
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_REGISTRY: dict[str, type[SegmentationModel]] = {}

OUTPUT_KINDS = ("binary", "multiclass")


class SegmentationModel(nn.Module):
    """Base class of every segmentation method.

    Subclasses set :attr:`num_tissues` and :attr:`output_kind` and implement :meth:`forward`.
    The keyword arguments a subclass was constructed with are recorded automatically (for
    :meth:`config`), so ``__init__`` must take only JSON-friendly arguments.

    Attributes:
        num_tissues: number of tissues of the registry the model was built for.
        output_kind: ``"binary"``: ``forward`` returns 2-channel logits (background, foreground)
            for the queried tissue; ``"multiclass"``: ``num_tissues + 1`` channels (background,
            then tissue ``id`` at channel ``id + 1``) for a softmax, and ``tissue`` is ignored.
        name: the registry name (set by :func:`register_model`).
        context: for the networks that pool their whole input (Omni-Seg's controller and
            presence gate, DeepLabV3's image pooling): the edge in input pixels of the window
            they pool instead, around each position, when the input is larger (a slide tile;
            :func:`~omniseg.models.blocks.window_pool`). None pools the whole input, as in
            training. :func:`~omniseg.checkpoint.load_model` sets it to the checkpoint's
            training patch size, so a tile of any size pools what training pooled.
    """

    num_tissues: int
    output_kind: str = "binary"
    name: str = ""
    in_channels: int = 3
    #: Input height and width must be multiples of this.
    size_multiple: int = 1
    context: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            # The first (most derived) constructor to run records: its arguments rebuild the
            # model. A subclass without its own __init__ records through the inherited one.
            if "_init_kwargs" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                params = dict(bound.arguments)
                params.pop("self")
                object.__setattr__(self, "_init_kwargs", params)
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def config(self) -> dict:
        """``{"name": ..., "kwargs": {...}}``: enough to rebuild the model with :func:`build_model`."""
        return {"name": self.name, "kwargs": dict(getattr(self, "_init_kwargs", {}))}

    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Logits for images ``x`` ``(B, 3, H, W)`` in [0, 1] and tissue ids ``tissue`` ``(B,)``."""
        raise NotImplementedError

    def check_input(self, x: Tensor, tissue: Tensor | None = None) -> None:
        """Raise ``ValueError`` for a malformed batch (shape, channels, size, tissue ids)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: input must be (B, C, H, W), got {shape}")
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"{self.name}: input has {c} channels, the model expects {self.in_channels} "
                f"(shape {tuple(x.shape)})"
            )
        m = self.size_multiple
        if h % m or w % m or h == 0 or w == 0:
            raise ValueError(
                f"{self.name}: input height and width must be positive multiples of {m}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: input must be a float tensor in [0, 1], got {x.dtype}")
        if tissue is None:
            return
        if not isinstance(tissue, Tensor) or tissue.shape != (b,):
            shape = tuple(tissue.shape) if isinstance(tissue, Tensor) else type(tissue).__name__
            raise ValueError(f"{self.name}: tissue must be a ({b},) tensor of ids, got {shape}")
        if tissue.is_floating_point() or tissue.is_complex() or tissue.dtype == torch.bool:
            raise ValueError(f"{self.name}: tissue ids must be integers, got {tissue.dtype}")
        self._check_ids(tissue.tolist() if tissue.device.type == "cpu" else tissue)

    def _check_ids(self, ids: Sequence[int] | Tensor) -> None:
        if isinstance(ids, Tensor):  # one device sync, the price of a clear error
            bad = ids[(ids < 0) | (ids >= self.num_tissues)].tolist()
        else:
            bad = [int(i) for i in ids if not 0 <= int(i) < self.num_tissues]
        if bad:
            raise ValueError(
                f"{self.name}: tissue id(s) {sorted(set(bad))} out of range 0..{self.num_tissues - 1}"
            )

    def predict_proba(self, x: Tensor, tissues: Sequence[int]) -> Tensor:
        """Foreground probabilities of each requested tissue.

        Args:
            x: ``(B, 3, H, W)`` float images in [0, 1].
            tissues: registry ids, in the order of the output channels.

        Returns:
            ``(B, T, H, W)`` probabilities, channel ``k`` for ``tissues[k]``. The generic
            version runs one forward per tissue (binary) or one forward in total (multiclass);
            subclasses may override it with something faster but equal.
        """
        tissues = [int(t) for t in tissues]
        self.check_input(x)
        self._check_ids(tissues)
        if not tissues:
            return x.new_zeros((x.shape[0], 0, *x.shape[2:]))
        b = x.shape[0]
        if self.output_kind == "multiclass":
            zeros = torch.zeros(b, dtype=torch.long, device=x.device)
            prob = self(x, zeros).softmax(dim=1)
            return prob[:, [t + 1 for t in tissues]]
        out = []
        for t in tissues:
            ids = torch.full((b,), t, dtype=torch.long, device=x.device)
            out.append(self(x, ids).softmax(dim=1)[:, 1])
        return torch.stack(out, dim=1)


def register_model(name: str) -> Callable[[type[SegmentationModel]], type[SegmentationModel]]:
    """Class decorator: make a :class:`SegmentationModel` subclass buildable as ``name``."""

    def decorate(cls: type[SegmentationModel]) -> type[SegmentationModel]:
        if not (isinstance(cls, type) and issubclass(cls, SegmentationModel)):
            raise TypeError(f"register_model({name!r}): {cls!r} is not a SegmentationModel")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def takes_implied_labels(name: str, strategy: str | None) -> bool:
    """Whether model ``name`` trained with ``strategy`` can learn implied labels
    (:func:`omniseg.partial_labels.implied_label_loss`): a binary network that runs every
    tissue's head on one backbone pass (``heads_logits``), trained with the binary strategy."""
    cls = _REGISTRY.get(name)
    return (
        cls is not None
        and hasattr(cls, "heads_logits")
        and cls.output_kind == "binary"
        and strategy in (None, "binary")
    )


def build_model(name: str, **kwargs: Any) -> SegmentationModel:
    """Build a registered model by name.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a keyword the model's
            constructor does not take (the message names it and lists the accepted ones).
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}"
        ) from None
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    bad = sorted(k for k in kwargs if k not in accepted)
    if bad:
        raise ValueError(
            f"model {name!r} got unexpected argument(s) {', '.join(bad)}; "
            f"it accepts: {', '.join(accepted)}"
        )
    return cls(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
