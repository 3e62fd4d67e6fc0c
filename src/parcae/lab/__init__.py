"""Experiments run with `parcae lab NAME`: each module trains and evaluates a small grid and writes a report."""
