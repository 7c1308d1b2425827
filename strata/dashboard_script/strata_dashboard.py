"""The script `strata dashboard` hands to `streamlit run` (Streamlit runs it again on every interaction).

Streamlit puts the folder of the script it runs first on sys.path. This folder holds nothing but this file, so no
module can be shadowed by it, whereas dashboard/ itself holds data.py, cache.py, charts.py, render.py, share.py...
Before importing the app, it checks that `activations`, `sae` and `dashboard` are Strata's own packages.
"""
import streamlit as st

from strata.install_check import find_clash

clash = find_clash()
if clash:
    st.error(f"Strata cannot start: {clash}")
else:
    from dashboard.app import main

    main()
