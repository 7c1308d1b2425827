"""The Strata dashboard (Streamlit + plotly) and the static share bundle.

    from dashboard.serve import serve_dashboard   # serve_dashboard(RUN, read_only=False, port=8501)
    from dashboard.share import write_share       # write_share(RUN, features="top:100") -> RUN/share

app.py is the Streamlit script; views/ holds its pages; render.py and charts.py build the HTML and figures
that both the app and the bundle show; data.py and cache.py read the run directory.
"""
