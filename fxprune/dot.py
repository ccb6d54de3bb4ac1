"""DOT drawings (pydot) of a Program's graph: nodes coloured by the group their channels
belong to, with a legend giving each group's size, state and parameters."""
from __future__ import annotations


import pydot
import torch.fx

_PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
            "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fb9a99", "#cab2d6"]
_FROZEN = "#eeeeee"
_BORDERS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999"]


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _target(node: torch.fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if callable(t) else str(t)


def _shape(node: torch.fx.Node) -> str:
    sym = node.meta.get("fxprune.shape")
    if isinstance(sym, tuple) and sym and not isinstance(sym[0], tuple):  # one tensor's symbolic shape
        return "(" + ", ".join(str(s) for s in sym) + ")"
    meta = node.meta.get("tensor_meta")
    return str(tuple(meta.shape)) if hasattr(meta, "shape") else ""


def _graph_node(node: torch.fx.Node, name: str, gids, groups) -> pydot.Node:
    """The DOT node of ``node``, named ``name``, coloured by the first of its groups ``gids``
    (ids into ``groups``; grey without groups or when that group is frozen)."""
    color = _FROZEN
    if gids and groups is not None:
        g = groups[gids[0]]
        color = _PALETTE[g.id % len(_PALETTE)] if g.prunable else _FROZEN
    label = f"{node.name}\\n{node.op} {_target(node)}"
    shape = _shape(node)
    if shape:
        label += f"\\n{shape}"
    if gids:
        label += "\\ngroups " + ",".join(map(str, gids[:6])) + ("..." if len(gids) > 6 else "")
    return pydot.Node(_q(name), label=_q(label).replace("\\\\n", "\\n"), fillcolor=color)


def graph_to_dot(gm: torch.fx.GraphModule, groups=None) -> pydot.Dot:
    """DOT of a GraphModule after any pass; uses the ``fxprune.*`` node metadata present."""
    dot = pydot.Dot("fxprune", graph_type="digraph", rankdir="TB")
    dot.set_node_defaults(shape="box", style="filled,rounded", fontname="Helvetica", fontsize="10")
    for node in gm.graph.nodes:
        dot.add_node(_graph_node(node, node.name, node.meta.get("fxprune.groups") or [], groups))
        for inp in node.all_input_nodes:
            dot.add_edge(pydot.Edge(_q(inp.name), _q(node.name)))
    return dot


def program_to_dot(prog) -> pydot.Dot:
    dot = graph_to_dot(prog.module, prog.groups)
    _legend(dot, prog.groups)
    _draw_erasables(dot, getattr(prog, "erasables", None) or [])
    return dot


def regions_to_dot(prog) -> pydot.Dot:
    """DOT of a region program (:class:`fxprune.regions.RegionProgram`): one cluster per region
    with its graph, nodes coloured by the global id of their first group, and the legend of
    the groups. Node names are ``region:node``."""
    dot = pydot.Dot("fxprune", graph_type="digraph", rankdir="TB")
    dot.set_node_defaults(shape="box", style="filled,rounded", fontname="Helvetica", fontsize="10")
    for ri, r in enumerate(prog.regions):
        gmap = prog._global_of[ri]
        cluster = pydot.Cluster(f"region_{ri}", label=_q(f"region {r.name} ({r.frontend}, {r.calls} call"
                                                          f"{'s' if r.calls != 1 else ''})"), fontname="Helvetica")
        for node in r.module.graph.nodes:
            gids = [gmap[g] for g in node.meta.get("fxprune.groups") or [] if g in gmap]
            name = f"{r.name}:{node.name}"
            cluster.add_node(_graph_node(node, name, gids, prog.groups))
            for inp in node.all_input_nodes:
                cluster.add_edge(pydot.Edge(_q(f"{r.name}:{inp.name}"), _q(name)))
        dot.add_subgraph(cluster)
    _legend(dot, prog.groups)
    _draw_erasables(dot, getattr(prog, "erasables", None) or [])
    return dot


def _legend(dot: pydot.Dot, groups) -> None:
    legend = pydot.Cluster("legend", label="groups", fontname="Helvetica")
    for g in groups:
        state = "prunable" if g.prunable else "frozen"
        if not g.exact:
            state += ", inexact"
        params = ", ".join(g.params[:4]) + (" ..." if len(g.params) > 4 else "")
        text = f"group {g.id}: {g.size} channels, {state}\\n{params}"
        if g.reason:
            text += f"\\n{g.reason[:80]}"
        color = _PALETTE[g.id % len(_PALETTE)] if g.prunable else _FROZEN
        legend.add_node(pydot.Node(_q(f"group_{g.id}"), label=_q(text).replace("\\\\n", "\\n"), fillcolor=color))
    dot.add_subgraph(legend)


def _draw_erasables(dot: pydot.Dot, erasables) -> None:
    """Outline the nodes of every erasable operator (innermost colour wins) and list them."""
    if not erasables:
        return
    legend = pydot.Cluster("erasables", label="erasable operators", fontname="Helvetica")
    for e in sorted(erasables, key=lambda e: (-len(e.nodes), e.id)):
        color = _BORDERS[e.id % len(_BORDERS)]
        for name in e.nodes:
            for n in dot.get_node(_q(name)):
                n.set("color", color)
                n.set("penwidth", "3")
        text = f"erasable {e.id} ({e.kind}): {len(e.nodes)} nodes, {e.num_params} params, {e.flops} FLOPs"
        if e.parents:
            text += f"\\nparents {e.parents[:8]}" + ("..." if len(e.parents) > 8 else "")
        legend.add_node(pydot.Node(_q(f"erasable_{e.id}"), label=_q(text).replace("\\\\n", "\\n"),
                                   color=color, penwidth="3", fillcolor="white"))
    dot.add_subgraph(legend)


def ir_text(gm: torch.fx.GraphModule) -> str:
    """The graph as text with fxprune's per-node metadata."""
    lines = [str(gm.graph), ""]
    for node in gm.graph.nodes:
        extra = []
        if "fxprune.op" in node.meta:
            extra.append(f"op={node.meta['fxprune.op'] or '<unknown>'}")
        elif "fxprune.spec" in node.meta:
            spec = node.meta["fxprune.spec"]
            extra.append(f"spec={spec.name if spec else '<unknown>'}")
        shape = _shape(node)
        if shape:
            extra.append(f"shape={shape}")
        if node.meta.get("fxprune.groups"):
            extra.append(f"groups={node.meta['fxprune.groups']}")
        lines.append(f"{node.name}: " + " ".join(extra))
    ca = gm.meta.get("fxprune")
    if ca is not None:
        lines.append("")
        lines += [repr(g) for g in ca.groups]
    return "\n".join(lines) + "\n"


__all__ = ["graph_to_dot", "program_to_dot", "regions_to_dot", "ir_text"]
