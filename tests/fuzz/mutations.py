"""Hypothesis strategies that mutate files: JSON documents (every node: delete, retype, extend,
duplicate a key, renumber), JSON text (truncate, flip, non-UTF-8), binary files (bit flips,
truncation, overwrites, insertions; positions drawn per region so that small regions such as an
8-byte length field are hit as often as large ones), and safetensors files (header length,
header JSON, truncation at every region).

A mutation is drawn as data and applied by a plain function, so a failing case prints as a
readable description (hypothesis shows the drawn values).
"""
from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

HOSTILE_STRINGS = ["", ".", "..", "../../../etc/passwd", "/etc/passwd", "/tmp", "a/../../b", "~", "%2E%2E",
                   "\x00", "名前", "\ud800", "a" * 300, "NaN", "-1", "1e309", "C:\\x", "finetunes/../..",
                   "ken_store.json", "manifest.json", "journal.jsonl", "whole.parquet"]
HUGE = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**100, -(2**63)]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 40), st.sampled_from(HUGE), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, -0.0, 1.0, 1e300]),
    st.sampled_from(HOSTILE_STRINGS), st.text(max_size=12),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


def paths(doc, prefix=()):
    """Every node of a JSON document as a key path (the root is ())."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


class Dup(dict):
    """A dict written with one key twice (the second value wins in Python's json, not everywhere)."""

    def __init__(self, items, dup_key, dup_value, first: bool):
        super().__init__(items)
        self.dup = (dup_key, dup_value, first)


def dumps(doc, indent=None) -> str:
    """json.dumps that also writes Dup's repeated key; NaN/Infinity as Python writes them."""
    if isinstance(doc, Dup):
        key, value, first = doc.dup
        pairs = [(k, v) for k, v in doc.items()]
        pairs = [(key, value)] + pairs if first else pairs + [(key, value)]
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in pairs) + "}"
    if isinstance(doc, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in doc.items()) + "}"
    if isinstance(doc, list):
        return "[" + ", ".join(dumps(v) for v in doc) + "]"
    return json.dumps(doc)


@st.composite
def json_mutation(draw, doc):
    """(description, mutated document) for a parsed JSON document; the document is not changed."""
    doc = json.loads(json.dumps(doc))
    all_paths = list(paths(doc))
    path = draw(st.sampled_from(all_paths))
    node = get(doc, path)
    parent = get(doc, path[:-1]) if path else None
    ops = ["replace", "whitespace"]
    if path:
        ops += ["delete"]
    if isinstance(node, dict):
        ops += ["add", "dup"]
    if isinstance(node, list):
        ops += ["append", "reverse", "empty"]
    if isinstance(node, int) and not isinstance(node, bool):
        ops += ["renumber", "renumber"]
    if isinstance(node, str):
        ops += ["restring"]
    op = draw(st.sampled_from(ops))
    desc = f"{op} at {list(path)}"

    def put(value):
        nonlocal doc
        if path:
            parent[path[-1]] = value
        else:
            doc = value

    if op == "replace":
        put(draw(json_values))
    elif op == "delete":
        del parent[path[-1]]
    elif op == "add":
        node[draw(st.one_of(st.text(max_size=8), st.sampled_from(["extra", "__proto__", "complete", "file"])))] = \
            draw(json_values)
    elif op == "dup" and node:
        key = draw(st.sampled_from(list(node)))
        put(Dup(node, key, draw(json_values), draw(st.booleans())))
    elif op == "append":
        node.append(draw(st.one_of(json_values, st.sampled_from(node) if node else json_values)))
    elif op == "reverse":
        node.reverse()
    elif op == "empty":
        node.clear()
    elif op == "renumber":
        put(draw(st.sampled_from([node + 1, node - 1, -node, -1, node * 2, node + 8, 0] + HUGE)))
    elif op == "restring":
        put(draw(st.one_of(st.sampled_from(HOSTILE_STRINGS), st.just(node + "x"), st.just(node.upper()))))
    return desc + ("" if op != "whitespace" else " (harmless)"), doc, op == "whitespace"


@st.composite
def json_text_mutation(draw, doc):
    """(description, bytes, harmless) for a JSON file: a document mutation written back, or
    damage to its text (truncation, a flipped byte, bytes that are not UTF-8, empty)."""
    kind = draw(st.sampled_from(["doc", "doc", "doc", "truncate", "flip", "not-utf8", "empty", "spaces"]))
    text = json.dumps(doc, indent=1).encode()
    if kind == "doc":
        desc, new, harmless = draw(json_mutation(doc))
        if harmless:
            return desc, json.dumps(new, indent=draw(st.sampled_from([None, 0, 4]))).encode() + b"\n  \n", True
        return desc, dumps(new).encode(), False
    if kind == "truncate":
        at = draw(st.integers(0, len(text) - 1))
        return f"truncated at byte {at}", text[:at], False
    if kind == "flip":
        at, bit = draw(st.integers(0, len(text) - 1)), draw(st.integers(0, 7))
        out = bytearray(text)
        out[at] ^= 1 << bit
        return f"bit {bit} of byte {at} flipped", bytes(out), out == text
    if kind == "not-utf8":
        at = draw(st.integers(0, len(text)))
        return f"0xff 0xfe inserted at byte {at}", text[:at] + b"\xff\xfe" + text[at:], False
    if kind == "spaces":
        return "surrounding whitespace (harmless)", b"\n\t " + text + b" \r\n", True
    return "empty file", b"", False


@st.composite
def byte_mutation(draw, data: bytes, regions: list[tuple[str, int, int]] | None = None):
    """(description, mutated bytes) for a binary file; `regions` (name, start, end) spread the
    positions over every region of the file, however small."""
    regions = regions or [("file", 0, len(data))]
    regions = [r for r in regions if r[2] > r[1]] or [("file", 0, max(1, len(data)))]
    name, lo, hi = draw(st.sampled_from(regions))
    at = draw(st.integers(lo, max(lo, hi - 1)))
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "overwrite", "insert", "zero", "delete"]))
    out = bytearray(data)
    if kind == "flip" and at < len(out):
        bit = draw(st.integers(0, 7))
        out[at] ^= 1 << bit
        return f"bit {bit} of byte {at} ({name}) flipped", bytes(out)
    if kind == "truncate":
        return f"truncated at byte {at} ({name})", bytes(out[:at])
    if kind == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=16))
        out[at: at + len(junk)] = junk
        return f"{len(junk)} bytes overwritten at {at} ({name})", bytes(out[: len(data)])
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=8))
        return f"{len(junk)} bytes inserted at {at} ({name})", bytes(out[:at] + junk + out[at:])
    if kind == "delete":
        n = draw(st.integers(1, 16))
        return f"{n} bytes deleted at {at} ({name})", bytes(out[:at] + out[at + n:])
    n = draw(st.integers(1, 64))
    out[at: at + n] = bytes(len(out[at: at + n]))
    return f"{n} bytes zeroed at {at} ({name})", bytes(out)


def safetensors_regions(data: bytes) -> list[tuple[str, int, int]]:
    """The length field, the JSON header, its padding, and each tensor's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    regions = [("length field", 0, 8), ("header", 8, 8 + n)]
    for name, spec in header.items():
        if name != "__metadata__":
            a, b = spec["data_offsets"]
            regions.append((f"data of {name}", 8 + n + a, 8 + n + b))
    regions.append(("last byte", len(data) - 1, len(data)))
    return regions


@st.composite
def safetensors_mutation(draw, data: bytes):
    """(description, bytes, harmless) for a safetensors file: header JSON mutations written back
    with a correct length (or the old one), the length field itself, or byte damage anywhere."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    body = data[8 + n:]
    kind = draw(st.sampled_from(["header", "header", "header", "length", "bytes", "bytes"]))
    if kind == "header":
        desc, new, harmless = draw(json_mutation(header))
        raw = (json.dumps(new, indent=draw(st.sampled_from([None, 1]))) if harmless else dumps(new)).encode()
        if draw(st.booleans()):
            raw += b" " * (-len(raw) % 8)  # safetensors pads to 8
        keep_length = not harmless and draw(st.integers(0, 4)) == 0
        if keep_length:
            raw = (raw + b" " * n)[:n]
            desc += " (old header length kept)"
        return "header: " + desc, struct.pack("<Q", len(raw)) + raw + body, harmless
    if kind == "length":
        value = draw(st.one_of(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(data), len(data) - 8, 2**60,
                                                2**64 - 1, 100 * 2**20 + 1]), st.integers(0, 2**64 - 1)))
        return f"header length {n} -> {value}", struct.pack("<Q", value) + data[8:], value == n
    desc, out = draw(byte_mutation(data, safetensors_regions(data)))
    return desc, out, out == data
