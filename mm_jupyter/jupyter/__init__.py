"""The Jupyter surface: IPython magics, widgets and the JupyterLab server extension.

This is the only layer that imports IPython, ipywidgets or plotly; ``store`` and ``search`` never do.
"""
