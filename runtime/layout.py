"""The order of a compiled step's inputs (what trace_joint records, what TrainStep and a saved
artifact read). This module imports the standard library only; it is part of pockc's runtime."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Layout:
    """Order of the step's inputs: trained params, frozen params, buffers, optimizer state,
    optimizer scalars, batch. ``grads`` lists (param, selection) for each gradient output."""
    params: list
    frozen: list
    buffers: list
    batch: int
    state: list = field(default_factory=list)      # (param name, state name)
    scalars: list = field(default_factory=list)
    grads: list = field(default_factory=list)      # (param name, selection) per gradient output
    unused: list = field(default_factory=list)     # trained params with no path to the loss

    def to_dict(self):
        return {k: getattr(self, k) for k in ("params", "frozen", "buffers", "state", "scalars", "batch")}

    def placeholders(self, graph) -> dict:
        """``graph``'s placeholder nodes by group, in input order: ``params``, ``frozen``,
        ``buffers``, ``state``, ``scalars`` (as many as this layout lists when called) and
        ``batch`` (the rest)."""
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        out, i = {}, 0
        for key in ("params", "frozen", "buffers", "state", "scalars"):
            count = len(getattr(self, key))
            out[key], i = phs[i:i + count], i + count
        out["batch"] = phs[i:]
        return out

    def to_json(self) -> dict:
        """Everything, JSON-ready (selections as lists), for a saved artifact."""
        d = {k: [list(x) if isinstance(x, tuple) else x for x in getattr(self, k)]
             for k in ("params", "frozen", "buffers", "state", "scalars", "unused")}
        d["batch"] = self.batch
        d["grads"] = [[name, _sel_json(sel)] for name, sel in self.grads]
        return d

    @classmethod
    def from_json(cls, d) -> "Layout":
        return cls(params=list(d["params"]), frozen=list(d["frozen"]), buffers=list(d["buffers"]),
                   batch=int(d["batch"]), state=[tuple(x) for x in d["state"]], scalars=list(d["scalars"]),
                   grads=[(name, _sel_from_json(sel)) for name, sel in d["grads"]], unused=list(d.get("unused", [])))


def _sel_json(sel):
    if sel is None:
        return None
    return [sel[0], *[list(map(int, x)) if isinstance(x, (tuple, list)) else int(x) for x in sel[1:]]]


def _sel_from_json(sel):
    if sel is None:
        return None
    return (sel[0], *[tuple(x) if isinstance(x, list) else x for x in sel[1:]])
