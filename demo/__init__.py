"""The Gradio demo as a small package, each module with one job:

    engines.py   which models are served (the offered profiles, loaded on first use)
    requests.py  what a visitor may ask for, validated with messages
    session.py   per-browser-session state: the stream in flight, what each pane shows
    render.py    texts, token spans, statistics, figures, the JSON records
    handlers.py  the event handlers (module-level, typed, updates keyed by component)
    layout.py    the page's components and the wiring of events to handlers
"""
from .layout import App, build_app, build_demo

__all__ = ["App", "build_app", "build_demo"]
