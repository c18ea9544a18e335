"""JSON through the C accelerator (``_json``) without importing the ``json`` package.

``import json`` pulls in ``re`` and ``enum`` (~9 ms of CPU at every run of the runner on a small
host); ``_json`` is what ``json`` itself uses underneath, so the results are the same bytes.
Anything the fast path does not handle (no ``_json``, a decoding error, ``bytes`` input) goes to
the real ``json`` module, so errors and their messages are exactly ``json``'s.
"""

try:
    import _json
    _make_scanner = _json.make_scanner
    _make_encoder = _json.make_encoder
    _esc_ascii = _json.encode_basestring_ascii
    _esc = _json.encode_basestring
except (ImportError, AttributeError):  # pragma: no cover (not CPython)
    _make_scanner = _make_encoder = None

_WS = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context(object):
    """The attributes ``json.JSONDecoder`` hands to the C scanner, with its defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = None


def loads(s):
    global _scan
    if _make_scanner is None or not isinstance(s, str) or s[:1] == "\ufeff":
        import json
        return json.loads(s)
    if _scan is None:
        _scan = _make_scanner(_Context())
    start = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, start)
    except StopIteration:
        obj, end = None, -1
    if end < 0 or s[end:].strip(_WS):
        import json
        return json.loads(s)    # raises json's own error
    return obj


def _default(o):
    raise TypeError("Object of type %s is not JSON serializable" % o.__class__.__name__)


def dumps(obj, ensure_ascii=True, separators=None):
    item_sep, key_sep = separators or (", ", ": ")
    if _make_encoder is None:
        import json
        return json.dumps(obj, ensure_ascii=ensure_ascii, separators=(item_sep, key_sep))
    enc = _make_encoder({}, _default, _esc_ascii if ensure_ascii else _esc, None, key_sep, item_sep,
                        False, False, True)
    return "".join(enc(obj, 0))
