"""Circuits: a saved attribution graph (RUN/graphs/<train>/<graph>.json) laid out by token position and layer.
Nodes carry their explanation, hover shows the feature's top contexts from the run's index, and a click (or the
node selector) highlights the node's strongest inputs and outputs and links its feature page. A node threshold
on the cumulative influence thins the graph; pinned nodes stay shown and are highlighted. Supernodes (named
groups of nodes) and pinned nodes are saved into the graph file; interventions run on the graph's prompt."""
from __future__ import annotations

import streamlit as st

from activations.errors import StrataError
from dashboard import charts, data, supernodes
from dashboard.render import feature_href, feature_link, grid, visible_token
from dashboard.views import intervene_panel
from dashboard.views.common import Ctx, html, md_code

NOT_FEATURES = ("embedding", "logit", "mlp reconstruction error")


def is_feature(node: dict) -> bool:
    """A node that is one SAE latent (transcoder, cross-layer transcoder, or another SAE kind a graph may use)."""
    return node["feature_type"] not in NOT_FEATURES and bool(node.get("sae")) and int(node.get("feature", -1)) >= 0


def top_contexts_hover(ctx: Ctx, train: str, graph: dict, n: int = 2) -> dict[str, str]:
    """node_id -> the feature's strongest contexts (escaped, one line each) when the run has an index for `train`."""
    if train not in data.index_names(ctx.run):
        return {}
    from dashboard import cache

    idx = cache.open_index(ctx.run, train)
    out = {}
    for node in graph["nodes"]:
        sid, f = node.get("sae"), int(node.get("feature", -1))
        if not is_feature(node) or sid not in idx.sae_ids or not 0 <= f < idx.n_latents(sid):
            continue
        rec = idx.feature(sid, f)
        lines = []
        for toks in rec["top_tokens"][:n]:
            ok = toks >= 0
            if ok.any():
                text = "".join(visible_token(idx.token_str(int(t))) for t in toks[ok])
                lines.append(charts.short(text, 60))
        if lines:
            out[node["node_id"]] = "top contexts:<br>" + "<br>".join(lines)
    return out


def feature_hrefs(train: str, graph: dict) -> dict[str, str]:
    return {n["node_id"]: feature_href(train, n["sae"], int(n["feature"])) for n in graph["nodes"]
            if is_feature(n)}


def node_name(node: dict) -> str:
    return f"{node['node_id']} · {charts.node_label(node)[:60]}"


def pick_graph(ctx: Ctx, graphs: list[tuple[str, str]]) -> tuple[str, str]:
    names = [f"{t}/{g}" for t, g in graphs]
    if "circuits_graph" not in st.session_state or st.session_state.circuits_graph not in names:
        asked = ctx.query.get("graph")
        st.session_state.circuits_graph = asked if asked in names else names[0]
    chosen = st.selectbox("graph", names, key="circuits_graph")
    if ctx.query.get("graph") != chosen:
        ctx.query["graph"] = chosen
    return graphs[names.index(chosen)]


def render_selected(ctx: Ctx, train: str, name: str, graph: dict, by_id: dict, selected: str) -> None:
    node = by_id[selected]
    pinned = charts.pinned_ids(graph)
    st.markdown(f"**{charts.node_label(node)}** — {node['feature_type']}, layer {node['layer']}, "
                f"position {node['ctx_idx']}" + (" · pinned" if selected in pinned else ""))
    if is_feature(node):
        html(feature_link(train, node["sae"], int(node["feature"]), f"open feature {node['sae']} #{node['feature']}"))
    if not ctx.read_only:
        unpin = selected in pinned
        if st.button("Unpin node" if unpin else "Pin node", key="circuits_pin",
                     help="pinned nodes stay shown whatever the node threshold; saved into the graph file"):
            new = [i for i in pinned if i != selected] if unpin else [*pinned, selected]
            try:
                supernodes.save_qparams(ctx.run, train, name, graph["qParams"]["supernodes"], new)
                st.rerun()
            except StrataError as e:
                st.error(str(e))
    ins, outs = charts.strongest_links(graph, selected)
    c = st.columns(2)
    for col, title, rows, end in ((c[0], "strongest inputs", ins, "source"), (c[1], "strongest outputs", outs, "target")):
        with col:
            st.caption(title)
            if rows:
                html(grid(["node", "weight"], [[charts.node_label(by_id[r[end]]) if r[end] in by_id else r[end],
                                                f"{r['weight']:+.4f}"] for r in rows]))
            else:
                st.write("none")


def render_supernodes(ctx: Ctx, train: str, name: str, graph: dict, by_id: dict) -> None:
    st.subheader("Supernodes")
    groups = graph["qParams"]["supernodes"]
    if groups:
        html(grid(["supernode", "nodes"], [[g[0], ", ".join(g[1:])] for g in groups]))
    else:
        st.caption("No supernodes yet: group nodes that do one thing under a name.")
    if ctx.read_only:
        return
    with st.form("supernode_form", clear_on_submit=True):
        members = st.multiselect("nodes", list(by_id), key="supernode_members",
                                 format_func=lambda i: node_name(by_id[i]))
        label = st.text_input("name", key="supernode_label", max_chars=80)
        add = st.form_submit_button("Save supernode")
    drop = st.selectbox("remove a supernode", ["", *[g[0] for g in groups]], key="supernode_drop") if groups else ""
    remove = bool(groups) and st.button("Remove", key="supernode_remove")
    try:
        if add:
            supernodes.save_qparams(ctx.run, train, name, [*groups, [label, *members]], graph["qParams"]["pinnedIds"])
            st.rerun()
        if remove and drop:
            supernodes.save_qparams(ctx.run, train, name, [g for g in groups if g[0] != drop],
                                    graph["qParams"]["pinnedIds"])
            st.rerun()
    except StrataError as e:
        st.error(str(e))


def render_new_graph(ctx: Ctx, train: str | None) -> None:
    """Build a graph from a prompt with the graph backend (`strata graph`), when this install has it."""
    try:
        from sae.circuits.graph import GraphConfig, make_graph
    except ImportError:
        st.caption("Graphs are made by `strata graph RUN --name TRAIN --prompt TEXT`.")
        return
    with st.expander("new graph from a prompt"):
        prompt = st.text_input("prompt", key="circuits_new_prompt")
        if st.button("Build graph", key="circuits_new") and prompt.strip() and train:
            try:
                make_graph(GraphConfig(run_dir=str(ctx.run), name=train, prompt=prompt))
                st.rerun()
            except StrataError as e:
                st.error(str(e))


def render(ctx: Ctx) -> None:
    st.header("Circuits")
    graphs = data.graph_names(ctx.run)
    if not ctx.read_only:
        render_new_graph(ctx, ctx.train)
    if not graphs:
        st.info(f"No attribution graphs in this run yet: make one with `strata graph {ctx.run} --name TRAIN "
                f"--prompt TEXT` (written to RUN/graphs/TRAIN/NAME.json) and reload.")
        return
    train, name = pick_graph(ctx, graphs)
    graph = data.read_graph(ctx.run, train, name)
    meta, by_id = graph["metadata"], {n["node_id"]: n for n in graph["nodes"]}
    st.caption(f"prompt {md_code(meta.get('prompt', ''))} · {len(graph['nodes'])} nodes, {len(graph['links'])} links"
               f" · influence kept {meta.get('influence_kept', float('nan')):.2f} · replacement score "
               f"{meta.get('replacement_score', float('nan')):.2f}")

    if st.session_state.get("circuits_node") not in ["", *by_id]:
        st.session_state.circuits_node = ""
    threshold = st.slider("node threshold (cumulative influence)", 0.05, 1.0, 1.0, 0.05, key="circuits_threshold",
                          help="show the most influential nodes holding this share of the influence; embeddings, "
                               "logits and pinned nodes are always shown")
    view = charts.filter_by_influence(graph, threshold)
    pinned = charts.pinned_ids(graph)
    n_links = len(view["links"])
    drawn = (f" · drawing the {charts.MAX_LINKS:,} strongest of their {n_links:,} links (largest share of their "
             f"target's input; a lower node threshold shows fewer)" if n_links > charts.MAX_LINKS else "")
    st.caption(f"showing {len(view['nodes'])} of {len(graph['nodes'])} nodes{drawn}"
               + (f" · pinned: {', '.join(pinned)}" if pinned else " · no pinned nodes: select a node to pin it"))
    event = st.plotly_chart(charts.circuit_figure(view, st.session_state.get("circuits_node") or None,
                                                  top_contexts_hover(ctx, train, graph), feature_hrefs(train, graph)),
                            key=f"circuit-{train}-{name}", on_select="rerun", selection_mode="points")
    clicked = [p.get("customdata") for p in (getattr(getattr(event, "selection", None), "points", None) or [])]
    clicked = [c[0] for c in clicked if c and c[0] in by_id]
    if clicked and st.session_state.get("circuits_clicked") != clicked[0]:
        st.session_state.circuits_clicked = clicked[0]
        st.session_state.circuits_node = clicked[0]
        st.rerun()
    selected = st.selectbox("node", ["", *by_id], key="circuits_node",
                            format_func=lambda i: node_name(by_id[i]) if i else "(none: whole graph)",
                            help="or click a node in the graph")
    if selected:
        render_selected(ctx, train, name, graph, by_id, selected)
    render_supernodes(ctx, train, name, graph, by_id)

    node = by_id.get(selected) if selected else None
    default = (f"{node['sae']}:{node['feature']}@{node['ctx_idx']}*0"
               if node and is_feature(node) else "")
    if train in data.train_names(ctx.run):
        intervene_panel.render(ctx, meta.get("prompt", ""), default, key=f"civ-{name}-{selected}",
                               ids=meta.get("prompt_ids"), train=train)
