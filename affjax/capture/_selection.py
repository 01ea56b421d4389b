"""Which captured layers a signature scores: :class:`LayerSelection`."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

from affjax.capture._layers import Layer

_FIELDS = ("include", "exclude", "kinds", "exclude_kinds")


def _names(field: str, value: str | Sequence[str] | None) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"{field} must be a string or a sequence of strings, got {value!r}")
    return names


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """The captured layers to score: name patterns and activation kinds to keep or drop.

    Frozen and hashable (a static argument of ``jax.jit``). Each field takes a sequence
    of strings, or one string (``include="layer1*"``); it is stored as a tuple. Empty
    fields select everything.

    Attributes:
      include, exclude: ``fnmatch`` patterns on layer names (``"*block1*"``).
      kinds, exclude_kinds: activation kinds to keep or drop (``"relu"``).

    Example:
      >>> import jax.numpy as jnp
      >>> from affjax.capture import Layer
      >>> x = jnp.ones((4, 2), jnp.float32)
      >>> layers = [Layer("a:0", "relu", x, x), Layer("b:0", "tanh", x, x),
      ...           Layer("a:1", "relu", x, x)]
      >>> select = LayerSelection(include="a:*")
      >>> select.include, [layer.name for layer in select.apply(layers)]
      (('a:*',), ['a:0', 'a:1'])
      >>> [layer.name for layer in LayerSelection(exclude_kinds=["relu"]).apply(layers)]
      ['b:0']
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    exclude_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in _FIELDS:
            object.__setattr__(self, field, _names(field, getattr(self, field)))

    @classmethod
    def of(
        cls,
        select: LayerSelection | None = None,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        kinds: str | Sequence[str] | None = None,
        exclude_kinds: str | Sequence[str] | None = None,
    ) -> LayerSelection:
        """The selection of a public function's arguments: ``select``, or the four keywords.

        Args:
          select: a :class:`LayerSelection`, or ``None``.
          include, exclude, kinds, exclude_kinds: the fields, when ``select`` is ``None``.

        Returns:
          ``select`` itself, or a new :class:`LayerSelection` of the keywords.

        Raises:
          ValueError: ``select`` and one of the keywords both given.
          TypeError: ``select`` is not a :class:`LayerSelection`.

        Example:
          >>> LayerSelection.of(kinds="relu") == LayerSelection(kinds=("relu",))
          True
          >>> LayerSelection.of(LayerSelection(), include=["a*"])
          Traceback (most recent call last):
          ...
          ValueError: give the layer selection either as select= or as include=, not both
        """
        keywords = {"include": include, "exclude": exclude, "kinds": kinds,
                    "exclude_kinds": exclude_kinds}
        if select is None:
            return cls(**{k: v or () for k, v in keywords.items()})
        given = [f"{k}=" for k, v in keywords.items() if v is not None]
        if given:
            raise ValueError("give the layer selection either as select= or as "
                             f"{', '.join(given)}, not both")
        if not isinstance(select, LayerSelection):
            raise TypeError(f"select must be an affjax.LayerSelection, got {select!r}")
        return select

    @classmethod
    def pop_from(cls, select: LayerSelection | None, kwargs: dict) -> LayerSelection:
        """:meth:`of` ``select`` and the selection keywords that ``kwargs`` holds, popped.

        The public functions take ``select=`` and, as before, ``include``, ``exclude``,
        ``kinds`` and ``exclude_kinds`` among their keyword arguments; this takes the
        latter out of those arguments, so that only the selection travels on.

        Example:
          >>> kwargs = {"kinds": "relu", "train": False}
          >>> LayerSelection.pop_from(None, kwargs).kinds, kwargs
          (('relu',), {'train': False})
        """
        return cls.of(select, **{field: kwargs.pop(field) for field in _FIELDS
                                 if field in kwargs})

    def apply(self, layers: Sequence[Layer]) -> list[Layer]:
        """The selected ``layers``, in their order.

        Args:
          layers: captured :class:`affjax.capture.Layer` objects.

        Returns:
          The layers that the selection keeps.

        Raises:
          ValueError: a pattern that matches no layer, a kind that no layer has, or a
            selection that keeps no layer.

        Example:
          >>> import jax.numpy as jnp
          >>> from affjax.capture import Layer
          >>> x = jnp.ones((4, 2), jnp.float32)
          >>> LayerSelection(kinds="gelu").apply([Layer("a:0", "relu", x, x)])
          Traceback (most recent call last):
          ...
          ValueError: activation kind 'gelu' not in this model; kinds are ['relu']
        """
        names = [layer.name for layer in layers]
        present_kinds = sorted({layer.kind for layer in layers})
        for pattern in self.include + self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"selection pattern {pattern!r} matches no activation; names are "
                    f"{names[:8]}{' ...' if len(names) > 8 else ''}"
                )
        for kind in self.kinds + self.exclude_kinds:
            if kind not in present_kinds:
                raise ValueError(
                    f"activation kind {kind!r} not in this model; kinds are {present_kinds}"
                )
        out = [layer for layer in layers if self._keeps(layer)]
        if not out:
            raise ValueError("the selection leaves no activation to score")
        return out

    def _keeps(self, layer: Layer) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(layer.name, p) for p in self.include):
            return False
        if self.exclude and any(fnmatch.fnmatchcase(layer.name, p) for p in self.exclude):
            return False
        if self.kinds and layer.kind not in self.kinds:
            return False
        return not (self.exclude_kinds and layer.kind in self.exclude_kinds)
