"""Reliability tools: soak (`python -m tools.soak`), fault storm (`python -m tools.storm`) and
fuzzing (`python -m tools.fuzz`). Nothing in the library imports this package."""
