"""Moving variables between an nnx.State and the plain trees on disk: flat "a.b.c" keys, nested string-keyed
dicts, and filling an abstract model state from any source through one lookup function (the packed export, the
official-checkpoint importers and quantized checkpoints all do exactly that)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import jax
from flax import nnx


def key(path) -> str:
    """('layers', 0, 'attention', 'wq', 'kernel') → 'layers.0.attention.wq.kernel'."""
    return ".".join(str(p) for p in path)


def flat(tree) -> dict[str, object]:
    """An nnx.State or a nested dict (of arrays or Variables) → {'layers.0.attention.wq.kernel': array}."""
    if isinstance(tree, nnx.State):
        return {key(p): v.get_value() for p, v in nnx.to_flat_state(tree)}
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)
        else:
            out[key(prefix)] = node.get_value() if isinstance(node, nnx.Variable) else node
    walk((), tree)
    return out


def nested(state: nnx.State) -> dict:
    """nnx.State → nested dict with string keys and array leaves (the tree Orbax writes)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = var.get_value()
    return out


def lookup_nested(tree: dict) -> Callable:
    """A `fill` lookup that reads the path from a nested string-keyed dict (as `nested` writes it)."""
    def lookup(path, want):
        node = tree
        for part in path:
            if not isinstance(node, dict) or str(part) not in node:
                raise KeyError(key(path))
            node = node[str(part)]
        return node
    return lookup


def fill(abstract: nnx.State, lookup: Callable) -> tuple[nnx.State, list[str], list[str]]:
    """Fill every variable of `abstract` with lookup(path, abstract value) → array.

    lookup raises KeyError(name) when its source lacks the variable and ValueError(why) when the source value
    cannot be converted. Returns (state of the variables found, missing names, bad values with reasons), so a
    caller reports every problem of a checkpoint at once.
    """
    leaves, missing, bad = [], [], []
    for path, var in nnx.to_flat_state(abstract):
        want = var.get_value()
        try:
            value = lookup(path, want)
        except KeyError as e:
            missing.append(str(e.args[0]) if e.args else key(path))
            continue
        except ValueError as e:
            bad.append(f"{key(path)}: {e}")
            continue
        if tuple(value.shape) != tuple(want.shape):
            bad.append(f"{key(path)}: shape {tuple(value.shape)}, expected {tuple(want.shape)}")
            continue
        leaves.append((path, var.replace(jax.numpy.asarray(value, want.dtype))))
    return nnx.from_flat_state(leaves), missing, bad


def staging_dir(out_dir: str) -> str:
    """A new empty sibling folder of `out_dir` to write into before `publish_dir`, with the permissions a plain
    mkdir gives (mkdtemp's 0700 would follow the folder to its final name)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_dir(tmp: str, out_dir: str) -> None:
    """Move the finished folder `tmp` to `out_dir` by renames, replacing what is there (the caller decides whether
    it may): out_dir is absent only between two renames, never half written."""
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
