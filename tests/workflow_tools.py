"""ComfyUI workflow formats, without ComfyUI: load a UI workflow, convert it to an API prompt, check it.

Pure Python (json only). The node definitions come from a ComfyUI server's ``GET /object_info``
(a dict ``{class_type: {"input": {"required": {...}, "optional": {...}}, "input_order": {...},
"output": [...], ...}}``), either live (host tests) or written by hand (default tests).

UI format (what the editor saves, ``workflows/*.json``)::

    {"nodes": [{"id": 3, "type": "KSampler", "mode": 0,
                "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                           {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": null}],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
                "widgets_values": [42, "fixed", 20, 8.0, "euler", "normal", 1.0]}, ...],
     "links": [[1, 4, 0, 3, 0, "MODEL"], ...]}     # [id, from_node, from_slot, to_node, to_slot, type]

API format (what ``POST /prompt`` takes)::

    {"3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 42, ...}}, ...}

How the editor (frontend 1.27) lays out ``widgets_values``: one value per widget input, in the
node definition's input order (required, then optional; ``input_order`` when given), where a
widget input is an INT / FLOAT / STRING / BOOLEAN / COMBO input without ``forceInput``. Some
inputs own extra UI widgets whose values follow their own value:

- "control after generate" (fixed / increment / decrement / randomize): an INT input whose options
  say ``control_after_generate: true`` (or, when the option is absent, an INT named ``seed`` or
  ``noise_seed``), and a COMBO with ``control_after_generate: true``;
- a ``remote`` combo's refresh button: 2 values; ``image_upload`` / ``video_upload``: 1 value
  (``"image"``); ``audio_upload``: 2 values.

A widget input that is linked (``inputs[i].widget`` with a ``link``) takes the link; its value stays
in ``widgets_values`` and is ignored. Frontend-only nodes: ``Note`` / ``MarkdownNote`` (dropped),
``Reroute`` (links pass through), ``PrimitiveNode`` (its value goes to the widget it feeds).
Node modes: 0 active, 2 muted (dropped, with its links), 4 bypassed (each output is fed by the
node's input of the same type: the same slot index first, then the first of that type).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
MODE_ACTIVE, MODE_MUTED, MODE_BYPASSED = 0, 2, 4
# Combo inputs that name files on the user's disk: a workflow is valid with names this machine
# lacks. Pass (a subset of) these to check_workflow(exempt_combo_inputs=...).
MODEL_FILE_INPUTS = frozenset({
    "ckpt_name", "vae_name", "lora_name", "unet_name", "clip_name", "clip_name1", "clip_name2",
    "control_net_name", "upscale_model_name", "model_name", "style_model_name", "weights", "image",
})


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, wrong widget count, bad link...)."""


# ---------------------------------------------------------------------------------------------
# node definitions

def load_ui_workflow(path: str | os.PathLike) -> dict:
    """Read a UI-format workflow (refuses API format, which has no ``nodes``/``links``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not (isinstance(data, dict) and isinstance(data.get("nodes"), list)
            and isinstance(data.get("links", []), list)):
        raise WorkflowError(f"{path}: not a UI-format workflow (no 'nodes' list)")
    return data


def input_type(spec: Any) -> str:
    """The type of an input spec ``[type, options]``: a list of choices (V1 combo) is "COMBO"."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(t, (list, tuple)):
        return "COMBO"
    return str(t)


def input_options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def combo_choices(spec: Any) -> list | None:
    """The allowed values of a combo input (V1: the list itself; V3: options["options"])."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if isinstance(t, (list, tuple)):
        return list(t)
    opts = input_options(spec)
    if isinstance(opts.get("options"), (list, tuple)):
        return list(opts["options"])
    return None


def ordered_inputs(defn: dict) -> list[tuple[str, Any, bool]]:
    """[(name, spec, required)] of a node definition: required then optional, in input order."""
    out = []
    inputs = defn.get("input", {})
    order = defn.get("input_order", {})
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or specs.keys())
        names += [n for n in specs if n not in names]
        out += [(n, specs[n], section == "required") for n in names if n in specs]
    return out


def is_widget(spec: Any) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def has_control_widget(name: str, spec: Any) -> bool:
    t, opts = input_type(spec), input_options(spec)
    cag = opts.get("control_after_generate")
    if t == "INT":
        return bool(name in ("seed", "noise_seed") if cag is None else cag)
    return t == "COMBO" and bool(cag)


def extra_widget_values(name: str, spec: Any) -> int:
    """How many UI-only values follow this input's own value in ``widgets_values``."""
    opts = input_options(spec)
    n = 1 if has_control_widget(name, spec) else 0
    if opts.get("remote"):
        n += 2
    if opts.get("image_upload") or opts.get("video_upload"):
        n += 1
    elif opts.get("audio_upload"):
        n += 2
    return n


def widget_layout(defn: dict) -> list[tuple[str, Any, int]]:
    """[(input name, spec, number of extra UI values)] for the widget inputs, in UI order."""
    return [(n, s, extra_widget_values(n, s)) for n, s, _ in ordered_inputs(defn) if is_widget(s)]


def expected_widget_count(defn: dict) -> int:
    return sum(1 + extra for _, _, extra in widget_layout(defn))


def types_match(out_type: Any, in_type: Any) -> bool:
    """Can an output of ``out_type`` feed an input of ``in_type``? ("*" is anything; "A,B" unions
    overlap; a combo input (list or "COMBO") takes "COMBO")."""
    o = "COMBO" if isinstance(out_type, (list, tuple)) else str(out_type)
    i = "COMBO" if isinstance(in_type, (list, tuple)) else str(in_type)
    if o == "*" or i == "*" or o == i:
        return True
    return bool({t.strip() for t in o.split(",")} & {t.strip() for t in i.split(",")})


# ---------------------------------------------------------------------------------------------
# the graph

class _Graph:
    def __init__(self, ui: dict):
        if not isinstance(ui, dict) or not isinstance(ui.get("nodes"), list):
            raise WorkflowError("not a UI-format workflow (no 'nodes' list)")
        self.ui = ui
        self.nodes = {n["id"]: n for n in ui["nodes"]}
        self.links: dict[Any, tuple] = {}
        for ln in ui.get("links") or []:
            if isinstance(ln, dict):  # the serialisation used inside subgraphs / schema v1
                ln = [ln.get("id"), ln.get("origin_id"), ln.get("origin_slot"), ln.get("target_id"),
                      ln.get("target_slot"), ln.get("type")]
            self.links[ln[0]] = tuple(ln[:6])
        subgraphs = (ui.get("definitions") or {}).get("subgraphs") or []
        self.subgraph_ids = {sg.get("id") for sg in subgraphs if isinstance(sg, dict)}

    def mode(self, node: dict) -> int:
        return node.get("mode", MODE_ACTIVE) or MODE_ACTIVE

    def input_link(self, node: dict, name: str):
        for inp in node.get("inputs") or []:
            if inp.get("name") == name:
                return inp.get("link")
        return None

    def resolve(self, link_id, seen=None):
        """Follow a link back through Reroutes and bypassed nodes.

        Returns ("node", node_id, slot), ("value", value) for a PrimitiveNode, or None when the
        chain ends at nothing (a muted node, an unconnected reroute, a dangling link).
        """
        seen = seen or set()
        if link_id is None or link_id in seen or link_id not in self.links:
            return None
        seen.add(link_id)
        _, src_id, slot, _, _, ltype = self.links[link_id]
        src = self.nodes.get(src_id)
        if src is None:
            return None
        if src.get("type") == "Reroute":
            ins = src.get("inputs") or []
            return self.resolve(ins[0].get("link") if ins else None, seen)
        if src.get("type") == "PrimitiveNode":
            wv = src.get("widgets_values") or []
            return ("value", wv[0]) if wv else None
        m = self.mode(src)
        if m == MODE_MUTED:
            return None
        if m == MODE_BYPASSED:
            outs = src.get("outputs") or []
            otype = outs[slot].get("type") if slot < len(outs) else ltype
            ins = src.get("inputs") or []
            order = ([slot] if slot < len(ins) else []) + [i for i in range(len(ins)) if i != slot]
            for i in order:
                if ins[i].get("link") is not None and types_match(ins[i].get("type"), otype) \
                        and ins[i].get("type") != "*":
                    return self.resolve(ins[i]["link"], seen)
            return None
        return ("node", src_id, slot)


def _widget_values(node: dict) -> list | dict:
    wv = node.get("widgets_values")
    return [] if wv is None else wv


def _split_widget_values(node: dict, defn: dict) -> dict[str, tuple[Any, list]]:
    """{input name: (value, [extra UI values])}; WorkflowError when the count is wrong."""
    layout = widget_layout(defn)
    wv = _widget_values(node)
    if isinstance(wv, dict):  # some packs store widgets by name
        return {n: (wv[n], []) for n, _, _ in layout if n in wv}
    need = sum(1 + e for _, _, e in layout)
    if len(wv) != need:
        raise WorkflowError(f"node {node.get('id')} ({node.get('type')}): {len(wv)} widget values, "
                            f"expected {need} for widgets {[n for n, _, _ in layout]}")
    out, i = {}, 0
    for name, _, extra in layout:
        out[name] = (wv[i], list(wv[i + 1:i + 1 + extra]))
        i += 1 + extra
    return out


# ---------------------------------------------------------------------------------------------
# UI -> API

def ui_to_api(ui: dict, object_info: dict, titles: bool = False) -> dict:
    """Convert a UI-format workflow to the API prompt ``POST /prompt`` takes.

    Frontend-only, muted and bypassed nodes are left out (links pass through reroutes and
    bypassed nodes). With ``titles``, each node gets ``_meta: {"title": ...}`` like the editor's
    export. Raises WorkflowError for what cannot be converted (run check_workflow for a list).
    """
    g = _Graph(ui)
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        ntype = node.get("type")
        if ntype in FRONTEND_ONLY or g.mode(node) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if ntype in g.subgraph_ids:
            raise WorkflowError(f"node {node['id']}: subgraph instances are not supported")
        defn = object_info.get(ntype)
        if defn is None:
            raise WorkflowError(f"node {node['id']}: unknown node type {ntype!r}")
        values = _split_widget_values(node, defn)
        inputs: dict[str, Any] = {}
        for name, spec, _required in ordered_inputs(defn):
            src = g.resolve(g.input_link(node, name))
            if src is not None and src[0] == "node":
                inputs[name] = [str(src[1]), src[2]]
            elif src is not None:          # a PrimitiveNode's value
                inputs[name] = src[1]
            elif name in values:
                inputs[name] = values[name][0]
        entry: dict[str, Any] = {"inputs": inputs, "class_type": ntype}
        if titles:
            entry["_meta"] = {"title": node.get("title") or defn.get("display_name") or ntype}
        prompt[str(node["id"])] = entry
    return prompt


# ---------------------------------------------------------------------------------------------
# checks

def _value_problem(name: str, spec: Any, value: Any, exempt: set[str]) -> str | None:
    t, opts = input_type(spec), input_options(spec)
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            return f"{name}: {value!r} is not an integer"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            return f"{name}: {value!r} is not a finite number"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: {value!r} is not a boolean"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"{name}: {value!r} is not a string"
    elif t == "COMBO":
        if name in exempt:
            return None
        choices = combo_choices(spec)
        if choices is None:
            return None
        vals = value if opts.get("multiselect") and isinstance(value, list) else [value]
        bad = [v for v in vals if v not in choices]
        if bad:
            shown = choices if len(choices) <= 12 else choices[:12] + ["..."]
            return f"{name}: {bad[0]!r} is not one of {shown}"
        return None
    if t in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo:
            return f"{name}: {value} is below the minimum {lo}"
        if hi is not None and value > hi:
            return f"{name}: {value} is above the maximum {hi}"
    return None


def check_workflow(ui: dict, object_info: dict,
                   exempt_combo_inputs: Iterable[str] = ()) -> list[str]:
    """Problems of a UI-format workflow against node definitions; [] when it is sound.

    Reports: unknown node types; links whose source output type does not fit the target input
    type, or that point at missing nodes/slots; wrong numbers of widget values; widget values
    invalid for their input (type, INT/FLOAT min/max, combo values not among the choices,
    unknown "control after generate" modes); unconnected required inputs of active nodes.
    Combo inputs named in ``exempt_combo_inputs`` (model/image file names, e.g.
    MODEL_FILE_INPUTS) may hold any value.
    """
    exempt = set(exempt_combo_inputs)
    problems: list[str] = []
    try:
        g = _Graph(ui)
    except WorkflowError as e:
        return [str(e)]

    def label(node: dict) -> str:
        return f"node {node.get('id')} ({node.get('type')})"

    # node types and widget values
    for node in ui["nodes"]:
        ntype = node.get("type")
        if ntype in FRONTEND_ONLY:
            continue
        if ntype in g.subgraph_ids:
            problems.append(f"{label(node)}: subgraph instances are not checked")
            continue
        defn = object_info.get(ntype)
        if defn is None:
            problems.append(f"{label(node)}: unknown node type {ntype!r}")
            continue
        try:
            values = _split_widget_values(node, defn)
        except WorkflowError as e:
            problems.append(str(e))
            values = {}
        specs = {n: (s, req) for n, s, req in ordered_inputs(defn)}
        for name, (value, extras) in values.items():
            spec = specs[name][0]
            if g.input_link(node, name) is not None:
                continue  # converted to an input and linked: the value is not used
            p = _value_problem(name, spec, value, exempt)
            if p:
                problems.append(f"{label(node)}: {p}")
            if has_control_widget(name, spec) and extras and extras[0] not in CONTROL_VALUES:
                problems.append(f"{label(node)}: {name}: control after generate {extras[0]!r} is "
                                f"not one of {sorted(CONTROL_VALUES)}")
        ui_inputs = {i.get("name") for i in node.get("inputs") or []}
        for inp in node.get("inputs") or []:
            if inp.get("name") not in specs:
                problems.append(f"{label(node)}: input {inp.get('name')!r} is not in the node "
                                "definition")
        if g.mode(node) == MODE_ACTIVE:
            for name, (spec, required) in specs.items():
                if required and not is_widget(spec) and g.resolve(g.input_link(node, name)) is None:
                    why = "not connected" if name in ui_inputs else "missing"
                    problems.append(f"{label(node)}: required input {name!r} is {why}")

    # links
    for lid, (_, src_id, src_slot, dst_id, dst_slot, ltype) in g.links.items():
        src, dst = g.nodes.get(src_id), g.nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {lid}: joins missing node {src_id if src is None else dst_id}")
            continue
        dst_inputs = dst.get("inputs") or []
        if not (isinstance(dst_slot, int) and 0 <= dst_slot < len(dst_inputs)):
            problems.append(f"link {lid}: {label(dst)} has no input slot {dst_slot}")
            continue
        if dst_inputs[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: {label(dst)} input slot {dst_slot} does not refer back "
                            "to it")
        # the type the source really produces
        if src.get("type") in FRONTEND_ONLY or src.get("type") in g.subgraph_ids:
            out_type = ltype  # reroute / primitive: the editor keeps the link's type
            if src.get("type") == "Reroute":
                r = g.resolve(lid)
                if r is not None and r[0] == "node":
                    rs = g.nodes[r[1]]
                    rd = object_info.get(rs.get("type"))
                    if rd and r[2] < len(rd.get("output", [])):
                        out_type = rd["output"][r[2]]
        else:
            sdef = object_info.get(src.get("type"))
            if sdef is None:
                continue  # reported as unknown above
            outs = sdef.get("output", [])
            if not (isinstance(src_slot, int) and 0 <= src_slot < len(outs)):
                problems.append(f"link {lid}: {label(src)} has no output slot {src_slot}")
                continue
            out_type = outs[src_slot]
        # the type the target declares
        name = dst_inputs[dst_slot].get("name")
        if dst.get("type") in FRONTEND_ONLY:
            continue
        ddef = object_info.get(dst.get("type"))
        if ddef is None:
            continue
        spec = dict((n, s) for n, s, _ in ordered_inputs(ddef)).get(name)
        if spec is None:
            continue  # reported above
        in_type = spec[0] if isinstance(spec[0], (list, tuple)) else input_type(spec)
        if not types_match(out_type, in_type):
            problems.append(f"link {lid}: {label(src)} output {src_slot} is "
                            f"{input_type([out_type])} but {label(dst)} input {name!r} takes "
                            f"{input_type([in_type])}")
    return problems
