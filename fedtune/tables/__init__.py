"""Extension tables: the one place each kind of extension is declared.

fedtune has seven extension points, each a dict from a name to an entry:

- dataset (``data.dataset``): ``fedtune.tables.datasets.DATASETS``
- strategy (``strategy.name``): ``fedtune.tables.strategies.STRATEGIES``
- model kind (``model.kind``): ``fedtune.tables.model_kinds.MODEL_KINDS``
- privacy mode (``privacy.mode``): ``fedtune.tables.privacy_modes.PRIVACY_MODES``
- runtime (``engine.backend``): ``fedtune.tables.runtimes.RUNTIMES``
- attack (``attack.name``): ``fedtune.tables.attacks.ATTACKS``
- device profile (``devices.profile``): ``fedtune.tables.devices.DEVICE_PROFILES``

An entry is light: it declares the config keys it owns (``Key``), its traits and its config
checks, and names its implementation as ``"module:attribute"``, imported the first time it is
used (the pattern of Flower's ``components`` and of Python entry points). The config is built
from the tables - the allowed names, the keys of each section, the checks - without importing
torch, Flower or Ray, so a mistake in a config is reported before any of them loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Key:
    """How one config key is declared: its default, its help line and its allowed values.

    ``kind`` is the value's type; it defaults to the type of ``default`` (a list default must
    say ``list[int]`` or ``list[str]``).
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    kind: Any = None
    infinite: bool = False  # a float key that takes inf (it means something: "no noise")

    @property
    def type(self) -> Any:
        if self.kind is not None:
            return self.kind
        if isinstance(self.default, list):
            raise TypeError(f"Key({self.default!r}, ...) needs kind=list[int] or list[str]")
        return type(self.default)


@dataclass(frozen=True)
class UsedWith:
    """When a key has an effect: only while ``chooser``, another key of its section, has one
    of ``values`` (``nonzero``: any value but 0). Every other setting ignores it, so a value
    given for it there is reported (``fedtune.config.keys_without_effect``)."""

    chooser: str
    values: tuple[Any, ...] = ()
    nonzero: bool = False

    def uses(self, chosen: Any) -> bool:
        """True when the key has an effect while its chooser is ``chosen``."""
        return chosen != 0 if self.nonzero else chosen in self.values

    def describe(self) -> str:
        """The settings that use the key ("partitioner = 'dirichlet'", "local_steps != 0")."""
        if self.nonzero:
            return f"{self.chooser} != 0"
        return f"{self.chooser} = " + " or ".join(repr(v) for v in self.values)


def key_field(declared: Key, owners: tuple[str, ...] = (),
              used_with: UsedWith | None = None) -> Any:
    """A dataclass field for ``declared``; ``owners`` are the table entries that use it
    (empty: the key applies whatever the section's choice is); ``used_with`` says when it has
    an effect (for a table's key: while its section's chooser names one of its owners)."""
    meta = {"key": declared, "owners": owners, "used_with": used_with}
    if isinstance(declared.default, list):
        default = list(declared.default)
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=declared.default, metadata=meta)


def key(default: Any, help: str, used_with: UsedWith | None = None, **allowed: Any) -> Any:
    """A field of a fixed config section: ``key(0.5, "Dirichlet alpha", gt=0)``;
    ``used_with``: the setting of another key it depends on (None: it always has an effect)."""
    return key_field(Key(default, help, **allowed), used_with=used_with)


@dataclass(frozen=True)
class ReplyMetric:
    """How one metric of a client's reply is declared: its type and the values it may take.
    ``fedtune.protocol`` builds the exact reply schema from these; a table entry declares the
    metrics its strategy or privacy mode adds.

    ``equals``: where the reply's other (already screened) metrics and the run's ``[client]``
    settings fix the value, ``(metrics, client settings) -> (the value, what fixes it)``; a
    reply whose value differs is refused (FedNova's ``fednova-a`` follows from ``num-steps``
    and the momentum: a client may not claim another)."""

    kind: type  # int or float (a float metric also takes an int; neither takes a bool or list)
    required: bool = True
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    equals: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[float, str]] | None = None

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not allowed for metric ``name`` (None: it is)."""
        allowed = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            what = "an integer" if self.kind is int else "a number"
            return f"metric {name!r} = {value!r} is not {what}"
        if not math.isfinite(value):
            return f"metric {name!r} is not finite"
        for bound, holds, sign in ((self.ge, value >= (self.ge or 0), ">="),
                                   (self.gt, value > (self.gt or 0), ">"),
                                   (self.le, value <= (self.le or 0), "<=")):
            if bound is not None and not holds:
                return f"metric {name!r} = {value!r} is not {sign} {bound:g}"
        return None

    def mismatch(self, name: str, metrics: Mapping[str, Any],
                 client: Mapping[str, Any]) -> str | None:
        """Why ``metrics[name]`` is not the value ``equals`` gives (None: it is, or nothing
        fixes it)."""
        if self.equals is None or name not in metrics:
            return None
        expected, because = self.equals(metrics, client)
        if math.isclose(metrics[name], expected, rel_tol=1e-9):
            return None
        return f"metric {name!r} = {metrics[name]!r}, but {because} give {expected:.6g}"


@dataclass(frozen=True)
class Entry:
    """What every table entry has: a help line, the config keys it owns, its implementation."""

    help: str
    keys: Mapping[str, Key] = field(default_factory=dict)
    implementation: str = ""  # "module:attribute", imported by ``load``

    def load(self) -> Any:
        """The implementation this entry names (imported now if it was not yet)."""
        return import_object(self.implementation)


def import_object(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError(f"{path!r} must look like 'package.module:attribute'")
    return getattr(importlib.import_module(module), attribute)


def section_class(name: str, doc: str, common: Mapping[str, Key],
                  table: Mapping[str, Entry], chooser: str,
                  common_used_with: Mapping[str, UsedWith] | None = None) -> type:
    """A config section dataclass: the ``common`` keys, then every key the ``table``'s entries
    own, in table order. An entry may share a key with another (the same ``Key``); the field's
    help then names every entry that uses it. ``chooser`` is the common key that names the
    entry (``kind``, ``name``, ...): an owned key has an effect only while it names an owner;
    ``common_used_with`` says when a common key has an effect (absent: always)."""
    owned: dict[str, tuple[Key, list[str]]] = {}
    for entry_name, entry in table.items():
        for key_name, declared in entry.keys.items():
            if key_name in common:
                raise ValueError(f"[{name}] {key_name} is common and owned by {entry_name}")
            if key_name in owned and owned[key_name][0] != declared:
                raise ValueError(f"[{name}] {key_name}: {entry_name} declares it differently "
                                 f"from {', '.join(owned[key_name][1])}")
            owned.setdefault(key_name, (declared, []))[1].append(entry_name)
    rules = common_used_with or {}
    fields: list[tuple[str, Any, Any]] = [
        (key_name, declared.type, key_field(declared, used_with=rules.get(key_name)))
        for key_name, declared in common.items()]
    for key_name, (declared, owners) in owned.items():
        fields.append((key_name, declared.type,
                       key_field(declared, tuple(owners), UsedWith(chooser, tuple(owners)))))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__doc__ = doc
    cls.__module__ = "fedtune.sections"
    return cls


def declared_key(f: dataclasses.Field[Any]) -> Key:
    """The ``Key`` behind a config section's field."""
    return f.metadata["key"]


def owners_of(f: dataclasses.Field[Any]) -> tuple[str, ...]:
    """The table entries that use a field (empty: every one)."""
    return f.metadata["owners"]


def used_with(f: dataclasses.Field[Any]) -> UsedWith | None:
    """When a field has an effect (None: always)."""
    return f.metadata.get("used_with")
