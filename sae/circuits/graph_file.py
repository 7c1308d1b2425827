"""The graph JSON (RUN/graphs/<train name>/<graph name>.json), close to circuit-tracer's so its users (and
Neuronpedia's viewer) can read it: `metadata`, `nodes`, `links`, `qParams`. Written atomically; `save_qparams`
rewrites only qParams (the dashboard's pinned nodes and supernodes)."""
from __future__ import annotations

import json
from pathlib import Path

from activations.atomic import atomic_write_json
from activations.errors import StrataError

SCHEMA = "strata-graph/1"
FEATURE_TYPES = ("cross layer transcoder", "transcoder", "mlp reconstruction error", "embedding", "logit")


def node_id(feature_type: str, layer: str, feature: int, ctx_idx: int) -> str:
    if feature_type == "mlp reconstruction error":
        return f"{layer}_err_{ctx_idx}"
    return f"{layer}_{feature}_{ctx_idx}"


def node(feature_type: str, layer: str, feature: int, ctx_idx: int, *, sae: str = "", activation: float = 0.0,
         influence: float = 0.0, token_prob: float = 0.0, clerp: str = "") -> dict:
    assert feature_type in FEATURE_TYPES, feature_type
    return {"node_id": node_id(feature_type, layer, feature, ctx_idx), "feature_type": feature_type, "layer": layer,
            "ctx_idx": int(ctx_idx), "feature": int(feature), "sae": sae, "activation": float(activation),
            "influence": float(influence), "token_prob": float(token_prob),
            "is_target_logit": feature_type == "logit", "clerp": clerp}


def write_graph(path, metadata: dict, nodes: list, links: list, pinned: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": dict(metadata, schema=SCHEMA), "nodes": nodes, "links": links,
           "qParams": {"pinnedIds": list(pinned), "supernodes": [], "linkType": "both"}}
    atomic_write_json(path, doc)
    return path


def read_graph(path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StrataError(f"no graph at {path}; make one with `strata graph RUN --name N --prompt ...`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StrataError(f"{path} is not a {SCHEMA} graph ({str(e)[:100]}); Strata replaces only graphs it wrote: "
                          f"move the file away, or choose another --graph-name") from None
    ok = (isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) and doc["metadata"].get("schema") == SCHEMA
          and isinstance(doc.get("nodes"), list) and isinstance(doc.get("links"), list))
    if not ok:
        raise StrataError(f"{path} is not a {SCHEMA} graph; Strata replaces only graphs it wrote: move the file "
                          f"away, or choose another --graph-name")
    return doc


def save_qparams(path, pinned: list, supernodes: list) -> None:
    """Rewrite the graph's qParams (everything else in the file stays as it was)."""
    doc = read_graph(path)
    ids = {n["node_id"] for n in doc["nodes"]}
    unknown = [i for i in list(pinned) + [i for s in supernodes for i in s[1:]] if i not in ids]
    if unknown:
        raise StrataError(f"node {unknown[0]!r} is not in graph {Path(path).name}; pin or group nodes of this graph")
    doc["qParams"] = dict(doc.get("qParams") or {}, pinnedIds=list(pinned), supernodes=[list(s) for s in supernodes])
    doc["qParams"].setdefault("linkType", "both")
    atomic_write_json(path, doc)
