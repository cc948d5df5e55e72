"""The supervisor process: the event loop (main.py) and its parts."""
