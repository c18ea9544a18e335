"""Cronium's manifest (docs/CRONIUM.md §2): a YAML subset parser and the normalised manifest."""
from . import RunnerError, jsonc

INTERPRETERS = {
    "bash": "bash", "sh": "bash", "shell": "bash",
    "python": "python", "python3": "python", "py": "python",
    "node": "node", "nodejs": "node", "javascript": "node", "js": "node",
}
REFUSED = {"http", "http_request", "httprequest", "tool", "tool_action", "toolaction"}

class _Lazy(object):
    """A regular expression compiled at its first use: ``re`` costs ~7 ms of CPU per run to import,
    and a run whose manifest comes in the header (the controller's way) parses no YAML."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.compiled = None

    def match(self, s):
        if self.compiled is None:
            import re
            self.compiled = re.compile(self.pattern)
        return self.compiled.match(s)


_INT = _Lazy(r"^[-+]?(0|[1-9][0-9]*)$")
_FLOAT = _Lazy(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][-+]?[0-9]+)?$")


class YamlError(ValueError):
    pass


def _strip_comment(s):
    """Remove a trailing `# comment` outside quotes."""
    quote = None
    for i, c in enumerate(s):
        if quote:
            if c == quote and not (quote == '"' and s[i - 1] == "\\"):
                quote = None
        elif c in "\"'" and (i == 0 or s[i - 1] in " \t:,[{"):
            quote = c
        elif c == "#" and (i == 0 or s[i - 1] in " \t"):
            return s[:i].rstrip()
    return s.rstrip()


def _scalar(s):
    s = s.strip()
    if not s:
        return None
    if s[0] == '"':
        try:
            return jsonc.loads(s)
        except ValueError:
            raise YamlError("bad double-quoted string %r" % s)
    if s[0] == "'":
        if len(s) < 2 or s[-1] != "'":
            raise YamlError("bad single-quoted string %r" % s)
        return s[1:-1].replace("''", "'")
    if s[0] in "[{":
        return _flow(s)
    low = s.lower()
    if low in ("null", "~"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if _INT.match(s):
        return int(s)
    if _FLOAT.match(s) and any(c.isdigit() for c in s):
        return float(s)
    return s


def _flow(s):
    """A flow collection: JSON first, then YAML flow style with plain keys/values."""
    try:
        return jsonc.loads(s)
    except ValueError:
        pass
    value, rest = _flow_value(s, 0)
    if s[rest:].strip():
        raise YamlError("trailing text after flow collection %r" % s)
    return value


def _flow_value(s, i):
    while i < len(s) and s[i] in " \t":
        i += 1
    if i >= len(s):
        raise YamlError("unexpected end of flow collection")
    c = s[i]
    if c in "[{":
        close = "]" if c == "[" else "}"
        out = [] if c == "[" else {}
        i += 1
        while True:
            while i < len(s) and s[i] in " \t,":
                i += 1
            if i >= len(s):
                raise YamlError("unterminated flow collection")
            if s[i] == close:
                return out, i + 1
            if c == "[":
                v, i = _flow_value(s, i)
                out.append(v)
            else:
                k, i = _flow_value(s, i)
                while i < len(s) and s[i] in " \t":
                    i += 1
                if i < len(s) and s[i] == ":":
                    v, i = _flow_value(s, i + 1)
                else:
                    v = None
                out[str(k) if not isinstance(k, str) else k] = v
    if c in "\"'":
        j = i + 1
        while j < len(s):
            if s[j] == "\\" and c == '"':
                j += 2
                continue
            if s[j] == c:
                if c == "'" and j + 1 < len(s) and s[j + 1] == "'":
                    j += 2
                    continue
                break
            j += 1
        return _scalar(s[i:j + 1]), j + 1
    j = i
    while j < len(s) and s[j] not in ",]}" and not (s[j] == ":" and (j + 1 == len(s) or s[j + 1] in " \t,]}")):
        j += 1
    return _scalar(s[i:j]), j


def parse_yaml(text):
    """Parse the block-style YAML subset Cronium (and Go/JS YAML encoders) write for manifests."""
    lines = []
    raw = text.replace("\r\n", "\n").split("\n")
    for n, line in enumerate(raw):
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise YamlError("line %d: tab indentation" % (n + 1))
        lines.append(line)
    pos = [0]

    def skip_blank():
        while pos[0] < len(lines):
            st = lines[pos[0]].strip()
            if st and not st.startswith("#") and st not in ("---", "..."):
                return
            pos[0] += 1

    def indent_of(line):
        return len(line) - len(line.lstrip(" "))

    def block_scalar(style, parent_indent):
        keep = style[1:2]
        buf = []
        ind = None
        while pos[0] < len(lines):
            line = lines[pos[0]]
            if line.strip() == "":
                buf.append("")
                pos[0] += 1
                continue
            if indent_of(line) <= parent_indent:
                break
            if ind is None:
                ind = indent_of(line)
            buf.append(line[ind:])
            pos[0] += 1
        while buf and buf[-1] == "" and keep != "+":
            buf.pop()
        if style[0] == ">":
            text_ = "\n".join(buf).replace("\n\n", "\0").replace("\n", " ").replace("\0", "\n")
        else:
            text_ = "\n".join(buf)
        return text_ if keep == "-" else text_ + "\n"

    def value_after(rest, indent):
        """The value of `key: rest` or `- rest`, possibly a nested block below."""
        rest = _strip_comment(rest).strip()
        if rest[:1] in ("|", ">"):
            pos[0] += 1
            return block_scalar(rest, indent)
        if rest and not rest.startswith("&"):
            pos[0] += 1
            return _scalar(rest)
        pos[0] += 1
        skip_blank()
        if pos[0] < len(lines):
            nxt = lines[pos[0]]
            ni = indent_of(nxt)
            if ni > indent or (ni == indent and nxt.lstrip().startswith("- ")):
                return block(ni)
        return None

    def block(indent):
        skip_blank()
        first = lines[pos[0]].strip()
        if first == "-" or first.startswith("- "):
            out = []
            while True:
                skip_blank()
                if pos[0] >= len(lines) or indent_of(lines[pos[0]]) != indent:
                    return out
                st = lines[pos[0]].strip()
                if not (st == "-" or st.startswith("- ")):
                    return out
                item = st[2:] if st != "-" else ""
                if _KEY.match(item) and not item.startswith(("{", "[", '"', "'")):
                    # "- key: value" starts a mapping indented at the item text
                    lines[pos[0]] = " " * (indent + 2) + item
                    out.append(block(indent + 2))
                else:
                    out.append(value_after(item, indent))
        out = {}
        while True:
            skip_blank()
            if pos[0] >= len(lines):
                return out
            line = lines[pos[0]]
            ind = indent_of(line)
            if ind < indent:
                return out
            if ind > indent:
                raise YamlError("line %d: unexpected indentation" % (pos[0] + 1))
            m = _KEY.match(line.strip())
            if not m:
                raise YamlError("line %d: expected 'key: value'" % (pos[0] + 1))
            key = m.group(1)
            if key[:1] in "\"'":
                key = _scalar(key)
            out[key] = value_after(line.strip()[m.end():], indent)

    skip_blank()
    if pos[0] >= len(lines):
        return {}
    st = lines[pos[0]].strip()
    if st.startswith(("{", "[")) and not _KEY.match(st):
        return _flow(_strip_comment("\n".join(lines[pos[0]:])).strip())
    result = block(indent_of(lines[pos[0]]))
    skip_blank()
    if pos[0] < len(lines):
        raise YamlError("line %d: unexpected indentation" % (pos[0] + 1))
    return result


_KEY = _Lazy(r"""^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s#'"{}\[\],:][^:#]*?)\s*:(?:\s+|$)""")


def load_manifest(data, name="manifest.yaml"):
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RunnerError("manifest", "%s is not UTF-8" % name)
    try:
        doc = parse_yaml(text)
    except (YamlError, IndexError) as e:
        raise RunnerError("manifest", "cannot parse %s: %s" % (name, e))
    return normalise(doc, name)


def normalise(doc, name="manifest"):
    """Check the Cronium fields; return dict(interpreter=bash|python|node, entrypoint, environment, metadata, ext)."""
    if not isinstance(doc, dict):
        raise RunnerError("manifest", "%s is not a mapping" % name)
    ext = doc.get("x-cronium-fab") or {}
    if not isinstance(ext, dict):
        ext = {}
    # the controller writes eventType (camelCase, like Cronium's metadata); event_type is accepted too
    etype = str(ext.get("eventType") or ext.get("event_type") or "").strip().lower()
    interp = str(doc.get("interpreter") or "").strip().lower()
    for t in (etype, interp):
        if t in REFUSED:
            raise RunnerError("refused", "payloads of type %s are refused: HTTP requests and tool actions "
                              "never run on SSH targets" % t.upper())
    if str(doc.get("version", "")).strip() != "v1":
        raise RunnerError("manifest", "%s: version must be \"v1\", got %r" % (name, doc.get("version")))
    if interp not in INTERPRETERS:
        raise RunnerError("manifest", "%s: unknown interpreter %r (bash, python or node)"
                          % (name, doc.get("interpreter")))
    entry = doc.get("entrypoint")
    if not isinstance(entry, str) or not entry.strip():
        raise RunnerError("manifest", "%s: entrypoint missing" % name)
    env = doc.get("environment") or {}
    if not isinstance(env, dict):
        raise RunnerError("manifest", "%s: environment must be a mapping" % name)
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        meta = {}
    return {
        "interpreter": INTERPRETERS[interp],
        "entrypoint": entry.strip(),
        "environment": dict((str(k), "" if v is None else _env_str(v)) for k, v in env.items()),
        "metadata": meta,
        "ext": ext,
    }


def _env_str(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return jsonc.dumps(v)
    return str(v)
