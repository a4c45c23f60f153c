"""One check of values against the rules in dataclass field metadata, used by config.validate for a RunConfig
(from flags or from a checkpoint) and by any other dataclass of options (generate.SamplingOptions).
"""
import math
import typing
from dataclasses import fields

from .errors import UserError

INT64 = (-2**63, 2**63 - 1)  # every int must fit in 64 bits: steps, seeds and counts become torch int64 values
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list"}
ITEM_WORDS = {int: "integers", float: "numbers", str: "strings"}
MAX_SHOWN = 60  # characters of a bad value quoted in an error line


def _expected_type(hint):
    """(type, whether None is allowed) for a field annotation: bool/int/float/str/tuple, or Optional[one of them]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typing.get_origin(hint) or hint, False


def _has_type(value, want):
    if want in (int, float) and isinstance(value, bool):  # True is an int to Python, not to a user
        return False
    return isinstance(value, (int, float) if want is float else want)


def _bounds(meta):
    """The metadata's bounds as [(test, words)]."""
    lo, hi = meta.get("min"), meta.get("max")
    out = []
    if lo is not None and hi is not None:
        out.append((lambda v: lo <= v <= hi, f"between {lo} and {hi}"))
    elif lo is not None:
        out.append((lambda v: v >= lo, f"at least {lo}"))
    elif hi is not None:
        out.append((lambda v: v <= hi, f"at most {hi}"))
    if "gt" in meta:
        out.append((lambda v: v > meta["gt"], f"greater than {meta['gt']}"))
    if "lt" in meta:
        out.append((lambda v: v < meta["lt"], f"less than {meta['lt']}"))
    return out


def _scalar_problem(value, want, meta):
    """What `value` must be, in words, if it breaks the field's rules; None if it is fine."""
    if not _has_type(value, want):
        return TYPE_WORDS.get(want, want.__name__)
    if "choices" in meta and value not in meta["choices"]:
        return "one of " + ", ".join(map(str, meta["choices"]))
    if want is float and not (math.isfinite(value) or (meta.get("finite") is False and not math.isnan(value))):
        return "a finite number"
    if want is int and not INT64[0] <= value <= INT64[1]:
        return "a 64-bit integer (between -2**63 and 2**63 - 1)"
    if want in (int, float):
        bounds = _bounds(meta)
        if not all(test(value) for test, _ in bounds):  # every test is written so that NaN fails it
            return " and ".join(words for _, words in bounds)
    return None


def _field_problem(value, want, meta):
    if want is not tuple:
        return _scalar_problem(value, want, meta)
    item = meta.get("type", str)
    kind = f"a list of {ITEM_WORDS.get(item, item.__name__)}"
    if not isinstance(value, tuple):
        return kind
    if len(value) < meta.get("min_items", 0):
        return f"{kind} with at least {meta['min_items']} item(s)"
    for x in value:
        problem = _scalar_problem(x, item, meta)
        if problem:
            return f"{kind}, each {problem}" if problem != TYPE_WORDS.get(item) else kind
    return None


def in_file(where, message):
    """The error line for a bad value read from the file `where` (a checkpoint) rather than given as a flag."""
    return f"{where} holds a value that is not allowed ({message}); the file is damaged or was edited"


def check_values(obj, where=None):
    """Check every field of the dataclass `obj` against the rules in its metadata: one UserError line for the first
    bad value, naming its flag. Works on any dataclass whose fields carry these (all optional) metadata keys:

        choices   the allowed values
        min, max  inclusive bounds; gt, lt exclusive bounds (of each item, for a tuple)
        finite    False lets a float be ±inf (floats are finite by default; NaN never passes)
        min_items the fewest items a tuple may have
        type      the type of a tuple's items (default str)
        flag      the flag named in messages (default "--" + the name with "-" for "_")

    The type comes from the annotation (bool, int, float, str, tuple or Optional[...] of one, which also allows
    None); ints must fit in 64 bits, and a float field takes an int. `where` None: the values came from flags
    ("--steps must be at least 1 (got 0)"); else it names the file they came from, and the line says it is damaged.
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        want, nullable = _expected_type(hints[f.name])
        problem = None if value is None and nullable else _field_problem(value, want, f.metadata)
        if problem:
            shown = repr(list(value) if isinstance(value, tuple) else value)
            shown = shown if len(shown) <= MAX_SHOWN else shown[:MAX_SHOWN] + "…"
            message = f"{flag_name(f)} must be {problem} (got {shown})"
            raise UserError(message if where is None else in_file(where, message))


def flag_name(f):
    """The command-line flag of a dataclass field: metadata "flag", else "--" + its name with "-" for "_"."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))
