"""One schema checker for every config dataclass: tokenizer, generator, sampling and training.

A config class declares its constraints next to its fields, in a ``field_rules`` class
variable (a :class:`Rule` per field name); subclasses add to or replace their parents'
rules. :func:`check_config` reads each field's type hint and rule and checks, for every
field:

* the type, without coercion: an ``int`` field takes only ints (``2.5``, ``"10"`` and
  ``True`` are errors), a ``float`` field ints or floats, a ``bool`` field only ``True`` or
  ``False``, a ``str`` field only strings, a ``tuple[...]`` field a list or tuple of the
  right length and item types (lists become tuples), a ``dict`` field a table, a nested
  config dataclass an instance of it (checked in turn, keys prefixed with its name), a
  union ``X | Y`` a value that fits one of its arms (a ``str`` arm under its rule's choices);
* that float fields are finite (``inf`` and ``nan`` are always errors);
* the rule's range, choices, minimum length and sane upper bound (``cap``: a value past it
  is a typo or an out-of-memory crash waiting to happen, e.g. ``codebook_size = 10**12``).

Every error is a :class:`ConfigError` (a ``ValueError``) whose message names the key by
its full dotted path, what it must be, and the value given, e.g.
``optim.lr must be a finite number > 0, got 0``. Cross-field checks (``width`` a multiple
of ``num_heads``...) stay in the classes' ``__post_init__``, after this checker.

Hand-written rather than pydantic or similar: those are heavy dependencies for what is a
couple of hundred lines over dataclasses and type hints, and they coerce by default (the very
thing that let ``steps = 2.5`` train 3 steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

# Sane upper bounds shared by the model configs: far above any published model, far below
# sizes whose tensors would not fit in memory.
MAX_CODEBOOK = 2**20
MAX_TOKENS = 2**16
MAX_WIDTH = 2**16
MAX_DEPTH = 1024
MAX_IMAGE_SIZE = 2**14


class ConfigError(ValueError):
    """A config value that breaks its schema; ``key`` is the field's dotted path."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key} {detail}")
        self.key, self.detail = key, detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # picklable (raised inside a worker process, it reaches the parent intact)
        return (type(self), (self.key, self.detail))

    def under(self, prefix: str) -> ConfigError:
        """The same error for the field seen from an enclosing config (``prefix.key``)."""
        return ConfigError(".".join(k for k in (prefix, self.key) if k), self.detail)


@dataclass(frozen=True)
class Rule:
    """Constraints on one field beyond its type (all optional).

    Attributes:
        ge, gt, le, lt: bounds of a number (or of every item of a tuple, through ``item``).
        cap: a sane upper bound; a larger value is refused as implausible, with ``why``.
        choices: the allowed strings; ``noun`` names what they are in the message.
        min_len: the fewest items of a variable-length tuple.
        item: the rule for each item of a tuple.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    cap: int | None = None
    why: str = ""
    choices: tuple[str, ...] | None = None
    noun: str = ""
    min_len: int = 0
    item: Rule | None = None


NO_RULE = Rule()
POSITIVE = Rule(ge=1)  # an int >= 1
NON_NEGATIVE = Rule(ge=0)
STRICTLY_POSITIVE = Rule(gt=0)  # a float > 0
PROBABILITY = Rule(ge=0, le=1)
FRACTION = Rule(ge=0, lt=1)  # [0, 1): dropout, label smoothing, Adam betas, EMA decay


def positive(cap: int, why: str = "") -> Rule:
    """An int >= 1 and at most ``cap``."""
    return Rule(ge=1, cap=cap, why=why)


def one_of(choices: typing.Iterable[str], noun: str = "") -> Rule:
    """A string among ``choices`` (``noun`` says what they are, e.g. "a masking schedule")."""
    return Rule(choices=tuple(choices), noun=noun)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _describe_number(integer: bool, rule: Rule) -> str:
    base = "an integer" if integer else "a finite number"
    low = ("[", rule.ge) if rule.ge is not None else ("(", rule.gt) if rule.gt is not None else None
    high = ("]", rule.le) if rule.le is not None else (")", rule.lt) if rule.lt is not None else None
    if low and high:
        return f"{'an integer' if integer else 'a number'} in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        if integer and low == ("[", 1):
            return "a positive integer"
        return f"{base} {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f"{base} {'<=' if high[0] == ']' else '<'} {_number(high[1])}"
    return base


def _union_args(hint: Any) -> tuple[Any, ...]:
    """The arms of a union hint ``X | Y`` other than None (empty for any other hint)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return ()


def _optional_inner(hint: Any) -> Any | None:
    """``X`` for a hint ``X | None``, else None."""
    args = _union_args(hint)
    if len(args) == 1 and type(None) in typing.get_args(hint):
        return args[0]
    return None


def describe(hint: Any, rule: Rule = NO_RULE) -> str:
    """What a value of type ``hint`` under ``rule`` must be, in words (for messages)."""
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{describe(inner, rule)} or null (None)"
    if _union_args(hint):  # X | Y: the rule applies to each arm it fits (choices to a str arm)
        return " or ".join(describe(a, rule) for a in _union_args(hint))
    if hint is bool:
        return "true or false"
    if hint in (int, float):
        return _describe_number(hint is int, rule)
    if hint is str:
        if rule.choices is not None:
            return f"{rule.noun + ', ' if rule.noun else ''}one of {', '.join(map(repr, rule.choices))}"
        return "a string"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        each = describe(args[0], rule.item or NO_RULE)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a {'non-empty ' if rule.min_len else ''}tuple (TOML list) of items, each {each}"
        return f"a tuple (TOML list) of {len(args)} items, each {each}"
    if hint is dict or typing.get_origin(hint) is dict:
        return "a table (dict)"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (a table in TOML)"
    return "any value"


def _in_range(value: float, rule: Rule) -> bool:
    return not (
        (rule.ge is not None and value < rule.ge)
        or (rule.gt is not None and value <= rule.gt)
        or (rule.le is not None and value > rule.le)
        or (rule.lt is not None and value >= rule.lt)
    )


def _fits(value: Any, hint: Any, rule: Rule) -> bool:
    """Type and range of a scalar or tuple value (caps and nested dataclasses are checked by the caller)."""
    inner = _optional_inner(hint)
    if inner is not None:
        return value is None or _fits(value, inner, rule)
    if _union_args(hint):
        return (value is None and type(None) in typing.get_args(hint)) or any(
            _fits(value, a, rule) for a in _union_args(hint)
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and _in_range(value, rule)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        # an int stands for a float, but one past float's range (10**400) is not finite either
        finite = math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max
        return finite and _in_range(value, rule)
    if hint is str:
        return isinstance(value, str) and (rule.choices is None or value in rule.choices)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(hint)
        variable = len(args) == 2 and args[1] is Ellipsis
        if (len(value) < rule.min_len) if variable else (len(value) != len(args)):
            return False
        item_hints = [args[0]] * len(value) if variable else list(args)
        return all(_fits(v, h, rule.item or NO_RULE) for v, h in zip(value, item_hints, strict=True))
    if hint is dict or typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True  # Any, or a type this checker does not know: left to the config's own checks


def _over_cap(value: Any, rule: Rule) -> Rule | None:
    """The rule whose ``cap`` ``value`` (or one of its items) exceeds, else None."""
    if isinstance(value, (tuple, list)):
        return next((r for v in value if (r := _over_cap(v, rule.item or NO_RULE))), None)
    over = isinstance(value, (int, float)) and not isinstance(value, bool) and rule.cap is not None
    return rule if over and value > rule.cap else None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_rules(cls: type) -> dict[str, Rule]:
    """The rules of ``cls``: every ``field_rules`` along its MRO, subclasses last (they win)."""
    rules: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        rules.update(klass.__dict__.get("field_rules", {}))
    unknown = set(rules) - {f.name for f in dataclasses.fields(cls)}
    if unknown:  # a programming error in the rules, not a user error
        raise TypeError(f"{cls.__name__}.field_rules names no field(s) {sorted(unknown)}")
    return rules


def check_value(key: str, value: Any, hint: Any, rule: Rule = NO_RULE) -> Any:
    """``value`` checked against ``hint`` and ``rule`` (lists become tuples for tuple fields),
    or a :class:`ConfigError` naming ``key``."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(key, f"must be {describe(hint)}, got {value!r}")
        check_config(value, key)
        return value
    if not _fits(value, hint, rule):
        raise ConfigError(key, f"must be {describe(hint, rule)}, got {value!r}")
    capped = _over_cap(value, rule)
    if capped is not None:
        why = f" ({capped.why})" if capped.why else ""
        raise ConfigError(key, f"= {value!r} is above the supported maximum {capped.cap}{why}")
    if isinstance(value, list) and typing.get_origin(_optional_inner(hint) or hint) is tuple:
        return tuple(value)
    return value


def check_config(config: Any, prefix: str = "") -> None:
    """Check every field of the dataclass instance ``config`` against its type hint and rule
    (nested config dataclasses too); ``prefix`` is its dotted path inside an enclosing config."""
    cls = type(config)
    hints, rules = _hints(cls), field_rules(cls)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        checked = check_value(key, value, hints[f.name], rules.get(f.name, NO_RULE))
        if checked is not value:
            setattr(config, f.name, checked)


class ConfigDict:
    """Dict conversion and schema checks (:mod:`mstok.config_schema`, rules in each class's
    ``field_rules``) shared by the config dataclasses of every model family."""

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Build a config, rejecting unknown fields with the list of valid ones (lists become tuples)."""
        if not isinstance(values, dict):
            raise TypeError(f"{cls.__name__} fields must be a dict of field values, got {values!r}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(cls.field_names())}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **overrides: Any) -> Any:
        """A copy with some fields changed (validated like :meth:`from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **overrides})
