"""Import a pyreft checkpoint (the directory ``ReftModel.save(d)`` writes) as a :class:`Graph`.

>>> import json, os, tempfile, torch, reftgraph as rg
>>> from reftgraph.files.pyreft import from_pyreft
>>> d, key = tempfile.mkdtemp(), "layer_1_comp_block_output_unit_pos_nunit_1#0"
>>> json.dump({"representations": [[1, "block_output", "pos", 1, 4]], "intervention_types":
...            ["<class 'pyreft.interventions.LoreftIntervention'>"]}, open(os.path.join(d, "config.json"), "w"))
>>> torch.save({"weight": torch.randn(4, 32), "bias": torch.zeros(4),
...             "rotate_layer": torch.linalg.qr(torch.randn(32, 4))[0]}, os.path.join(d, f"intkey_{key}.bin"))
>>> g = from_pyreft(d, positions="f5+l5")
>>> [str(n) for n in g]
['pyreft_L1_0: LoReFT resid_post[1] pos=f5+l5']
>>> _ = g.run(rg.models.tiny("llama"), ["hello there"])

pyvene's ``IntervenableModel.save`` writes ``config.json`` and one ``intkey_{key}.bin`` per intervention,
read here only with ``torch.load(weights_only=True)``; NaN or infinite weights are refused. pyreft
saves neither the positions nor ``act_fn``/dropout: pass ``positions`` and ``act`` (pyreft's own
``load`` uses linear); dropout is 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..core.graph import Graph
from ..core.ops.reft import ACTIVATIONS, REFT_OPS
from ..core.sites import Site
from ..errors import GraphFileError, SiteError

CLASSES = {"LoreftIntervention": "LoReFT", "NoreftIntervention": "NoReFT", "DireftIntervention": "DiReFT",
           "NodireftIntervention": "NoDiReFT", "ConsreftIntervention": "ConsReFT", "LobireftIntervention": "LoBiReFT"}
COMPONENTS = {"block_output": "resid_post", "block_input": "resid_pre", "mlp_output": "mlp_out",
              "attention_output": "attn_out"}
DEFAULTS = dict(layer=0, component="block_output", unit="pos", max_number_of_units=1, low_rank_dimension=None)
ORIG, BASE = "rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base"


def _load(f: Path) -> dict:
    if not f.is_file():
        raise GraphFileError(f"missing intervention file {f.name} in {f.parent} (config.json lists this intervention)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise GraphFileError(f"{f.name}: torch.load(weights_only=True) refused it (not a plain tensor state dict): "
                        f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GraphFileError(f"{f.name}: expected a dict of tensors, got {type(state).__name__}")
    state = {k: v.float() for k, v in state.items() if k not in ("embed_dim", "interchange_dim")}
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:  # load_graph refuses such weights too: they would give NaN logits
        raise GraphFileError(f"{f}: tensor {bad[0]!r} holds NaN or infinite values")
    return state


def _tensor(t: dict, f: Path, names: tuple, shape: tuple) -> torch.Tensor:
    name = next((k for k in names if k in t), None)
    if name is None or tuple(t[name].shape) != shape:
        got = f"has shape {tuple(t[name].shape)}" if name else f"is missing (the file holds {sorted(t)})"
        raise GraphFileError(f"{f.name}: {name or ' or '.join(names)!r} {got}, expected shape {shape}")
    return t[name]


def _rotation(t: dict, f: Path, d: int, rank: int) -> torch.Tensor:  # R^T [d, rank]
    if "proj_layer.weight" in t:
        return _tensor(t, f, ("proj_layer.weight",), (rank, d)).T
    if ORIG not in t:
        return _tensor(t, f, ("rotate_layer",), (d, rank))
    m = nn.utils.parametrizations.orthogonal(nn.Linear(rank, d, bias=False))  # pyreft's rotate_layer.weight
    m.load_state_dict({"parametrizations.weight.original": _tensor(t, f, (ORIG,), (d, rank)),
                       "parametrizations.weight.0.base": _tensor(t, f, (BASE,), (d, d))})
    return m.weight.detach()


def _selectors(positions, reps: list) -> list:
    n, sites = len(reps), [(r["layer"], r["component"]) for r in reps]
    if isinstance(positions, list) and not all(isinstance(p, int) for p in positions):
        if len(positions) != n:
            raise SiteError(f"positions has {len(positions)} selectors but the checkpoint has {n} interventions; "
                            "pass one selector for all or one per intervention key, in order")
        return positions
    m = re.fullmatch(r"f(\d+)\+l(\d+)", positions) if isinstance(positions, str) else None
    if m and all(int(x) > 0 for x in m.groups()) and n % 2 == 0 and sites[:n // 2] == sites[n // 2:]:
        # pyreft's untied layout: first half on the first N, second on the last M (get_intervention_locations)
        return [f"f{m[1]}+l0"] * (n // 2) + [f"f0+l{m[2]}"] * (n // 2)
    return [positions] * n


def _keys(path: Path, reps: list) -> list:
    seen, ids = {}, []  # pyvene's keys: (layer, component, repeat), named as pyvene >= 0.1.7 or before
    for r in reps:
        ids.append((r["layer"], r["component"], seen.get((r["layer"], r["component"]), 0)))
        seen[ids[-1][:2]] = ids[-1][2] + 1
    styles = [[p.format(*i) for i in ids]
              for p in ("layer_{}_comp_{}_unit_pos_nunit_1#{}", "layer.{}.comp.{}.unit.pos.nunit.1#{}")]
    return max(styles, key=lambda ks: sum((path / f"intkey_{k}.bin").is_file() for k in ks))


def from_pyreft(path, positions, component_map: dict | None = None, act: str = "identity") -> Graph:
    """A graph with one ReFT node per pyreft intervention, named ``pyreft_L{layer}_{i}``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())     # what pyreft writes for one rank-2 LoReFT at layer 0:
    >>> _ = (d / "config.json").write_text(json.dumps({"representations": [[0, "block_output", "pos", 1, 2]],
    ...                                                "intervention_types": ["LoreftIntervention"]}))
    >>> torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2), "rotate_layer": torch.eye(32)[:, :2]},
    ...            d / "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin")
    >>> print(from_pyreft(d, positions="last"))
    Graph(1 nodes, 130 trainable parameters)
      pyreft_L0_0: LoReFT resid_post[0] pos=last

    ``positions``: one selector for every intervention (``"f5+l5"`` splits pyreft's untied
    layout, layers listed twice, into first/last halves as pyreft does), or one per intervention
    key in config order. ``component_map`` maps more pyreft components (``{pyreft_name: component}``).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GraphFileError(f"no config.json in {path}: not a pyreft checkpoint (ReftModel.save writes config.json "
                        "and one intkey_*.bin per intervention)")
    if act not in ACTIVATIONS:
        raise GraphFileError(f"unknown act {act!r}; choose one of {sorted(ACTIVATIONS)}")
    try:
        cfg = json.loads((path / "config.json").read_text())
        reps = [{**DEFAULTS, **(dict(zip(DEFAULTS, r)) if isinstance(r, list) else r)} for r in cfg["representations"]]
        types = [str(t).rstrip("'>").rsplit(".", 1)[-1] for t in cfg["intervention_types"]]
    except (ValueError, KeyError, TypeError) as e:
        raise GraphFileError(f"{path / 'config.json'}: not a pyreft/pyvene config ({type(e).__name__}: {e})") from None
    dims = cfg.get("intervention_dimensions") or [None] * len(reps)
    components = {**COMPONENTS, **(component_map or {})}
    if len(types) != len(reps) or len(dims) != len(reps):
        raise GraphFileError(f"config.json: {len(reps)} representations, {len(types)} types, {len(dims)} dimensions")
    g, per_layer = Graph(), {}
    for r, type_name, key, dim, sel in zip(reps, types, _keys(path, reps), dims, _selectors(positions, reps)):
        layer, comp, unit, nunit = (r[k] for k in list(DEFAULTS)[:4])
        if not isinstance(layer, int) or layer < 0 or comp not in components or (unit, nunit) != ("pos", 1):
            raise GraphFileError(f"unsupported pyreft representation layer={layer!r} component={comp!r} unit={unit!r} "
                            f"x{nunit}: need unit 'pos' x1 and a component in {sorted(components)} (or component_map=)")
        if type_name not in CLASSES:
            raise GraphFileError(f"unsupported pyreft intervention class {type_name!r}; supported: {sorted(CLASSES)}")
        cls, t = REFT_OPS[CLASSES[type_name]], _load(f := path / f"intkey_{key}.bin")
        shape = next((t[k].shape for k in ("rotate_layer", ORIG, "proj_layer.weight") if k in t), (0,))
        d, rank = dim or max(shape), r.get("low_rank_dimension") or min(shape)
        rot = _rotation(t, f, d, rank)
        if cls.orthogonal and not torch.allclose(rot.T @ rot, torch.eye(rank), atol=1e-2):
            raise GraphFileError(f"{f.name}: R^T does not have orthonormal columns, as {type_name} needs")
        op = cls(width=d, rank=rank, act=act)
        with torch.no_grad():
            op.rotate.copy_(rot)
            if cls.uses_w:
                op.weight.copy_(_tensor(t, f, ("weight", "learned_source.weight"), (rank, d)))
                op.bias.copy_(_tensor(t, f, ("bias", "learned_source.bias"), (rank,)))
            else:
                op.bias.copy_(_tensor(t, f, ("learned_source",), (rank,)))
            if cls.subtracts and "proj_layer.bias" in t:  # NoReFT: act(Wh + b) - (Rh + c)
                c = _tensor(t, f, ("proj_layer.bias",), (rank,))
                if act not in ("identity", "linear") and bool(c.any()):
                    raise GraphFileError(f"{f.name}: NoReFT's proj_layer bias folds into b only for act='identity'")
                op.bias.sub_(c)
        i = per_layer[layer] = per_layer.get(layer, -1) + 1
        g.add(Site(components[comp], layer=layer, positions=sel), op, name=f"pyreft_L{layer}_{i}")
    return g
