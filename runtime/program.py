"""A compiled step's FX program as JSON, and back: what a saved artifact stores as its program.

Every node is written with its op, name, target and arguments. Targets are named, never pickled:
an aten overload by its qualified name (``aten::mm.default``), a function of Python's ``operator``
module (``getitem``) or of pockc's runtime (the paging calls) by module and name; anything else
cannot be saved. Arguments are JSON values, with tagged objects for node references, tuples,
dtypes, devices, layouts, memory formats, slices and non-finite floats. Tensor constants of the
graph (``get_attr`` nodes) are returned separately, to be stored with the other tensors.

Loading rebuilds the ``torch.fx.Graph`` node by node and resolves each target again (an aten op
missing from this torch is an error naming it), so the program that runs is the one that was
compiled, op for op, with the same arguments. ``node.meta["pockc.role"]`` (forward, backward,
update) is kept; fake-tensor metadata is not.

This module imports torch and the standard library only; it is part of pockc's runtime.
"""
from __future__ import annotations

import importlib
import math
import operator

import torch
import torch.fx as fx

FORMAT = "pockc-fx-program"
VERSION = 1

_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(m): m for m in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
                                       torch.preserve_format)}
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


class ProgramError(ValueError):
    """A graph that cannot be written (an unsupported target or argument) or read back."""


# -- targets --------------------------------------------------------------------------------
def target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return "op:" + target.name()                         # aten::mm.default
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if module in ("_operator", "operator") and getattr(operator, name or "", None) is target:
        return "operator:" + name
    if module.startswith("pockc.runtime.") and name and getattr(importlib.import_module(module), name, None) is target:
        return f"py:{module}:{name}"
    raise ProgramError(f"the program calls {target!r} ({module}.{name}), which a saved step cannot name; "
                       "only aten ops, operator.* and pockc.runtime functions can be saved")


def resolve_target(name: str):
    kind, _, rest = name.partition(":")
    if kind == "op":
        qual, _, overload = rest.partition(".")
        ns, _, op = qual.partition("::")
        try:
            packet = getattr(getattr(torch.ops, ns), op)
            return getattr(packet, overload or "default")
        except (AttributeError, RuntimeError):
            raise ProgramError(f"the program calls {rest}, which this torch ({torch.__version__}) does not have") from None
    if kind == "operator":
        fn = getattr(operator, rest, None)
        if callable(fn):
            return fn
    if kind == "py":
        module, _, attr = rest.partition(":")
        if module.startswith("pockc.runtime."):
            fn = getattr(importlib.import_module(module), attr, None)
            if callable(fn):
                return fn
    raise ProgramError(f"the program names an unknown call target {name!r}")


# -- arguments ------------------------------------------------------------------------------
def _arg_to_json(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        items = [_arg_to_json(x) for x in a]
        return items if isinstance(a, list) else {"tuple": items}
    if isinstance(a, dict):
        return {"dict": [[k, _arg_to_json(v)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a)}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a)}
    if isinstance(a, slice):
        return {"slice": [_arg_to_json(a.start), _arg_to_json(a.stop), _arg_to_json(a.step)]}
    raise ProgramError(f"a graph argument of type {type(a).__name__} ({a!r}) cannot be saved")


def _arg_from_json(a, env):
    if isinstance(a, list):
        return [_arg_from_json(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return env[v]
    if tag == "tuple":
        return tuple(_arg_from_json(x, env) for x in v)
    if tag == "dict":
        return {k: _arg_from_json(x, env) for k, x in v}
    if tag == "float":
        return float(v)
    if tag == "dtype":
        return _DTYPES[v]
    if tag == "device":
        return torch.device(v)
    if tag == "memory_format":
        return _MEMORY_FORMATS[v]
    if tag == "layout":
        return _LAYOUTS[v]
    if tag == "slice":
        return slice(*(_arg_from_json(x, env) for x in v))
    raise ProgramError(f"unknown argument tag {tag!r}")


# -- the graph ------------------------------------------------------------------------------
def graph_to_json(gm: fx.GraphModule):
    """(JSON-ready dict of ``gm``'s graph, {attribute name: tensor} of its tensor constants)."""
    nodes, constants = [], {}
    for n in gm.graph.nodes:
        d = {"op": n.op, "name": n.name}
        if n.op == "call_function":
            d["target"] = target_name(n.target)
        elif n.op == "get_attr":
            value = gm
            for part in n.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise ProgramError(f"graph attribute {n.target!r} is a {type(value).__name__}, not a tensor")
            constants[n.target] = value
            d["target"] = n.target
        elif n.op in ("placeholder", "output"):
            d["target"] = n.target
        else:
            raise ProgramError(f"graph node {n.name} is a {n.op}; a saved step holds call_function nodes only")
        d["args"] = _arg_to_json(n.args)
        d["kwargs"] = _arg_to_json(dict(n.kwargs))
        role = n.meta.get("pockc.role")
        if role is not None:
            d["role"] = role
        if n.meta.get("pockc.tier"):        # optimizer state kept in the slow tier (runtime/paging.py)
            d["tier"] = n.meta["pockc.tier"]
        nodes.append(d)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes}, constants


def graph_from_json(d: dict, constants: dict) -> fx.GraphModule:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ProgramError("not a pockc program")
    if d.get("version") != VERSION:
        raise ProgramError(f"program format version {d.get('version')} (this pockc reads {VERSION})")
    graph, env = fx.Graph(), {}
    root = torch.nn.Module()
    for name, t in constants.items():
        root.register_buffer(name.replace(".", "_"), t)
    try:
        for nd in d["nodes"]:
            op, args = nd["op"], _arg_from_json(nd["args"], env)
            kwargs = _arg_from_json(nd["kwargs"], env)
            if op == "get_attr":
                target = nd["target"].replace(".", "_")
            elif op == "call_function":
                target = resolve_target(nd["target"])
            elif op in ("placeholder", "output"):
                target = nd["target"]
            else:
                raise ProgramError(f"node {nd['name']}: unknown op {op!r}")
            node = graph.create_node(op, target, tuple(args), kwargs, name=nd["name"])
            if node.name != nd["name"]:
                raise ProgramError(f"node name {nd['name']!r} is not usable")
            if "role" in nd:
                node.meta["pockc.role"] = nd["role"]
            if "tier" in nd:
                node.meta["pockc.tier"] = nd["tier"]
            env[nd["name"]] = node
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ProgramError):
            raise
        raise ProgramError(f"malformed program ({type(e).__name__}: {e})") from None
    graph.lint()
    return fx.GraphModule(root, graph)
