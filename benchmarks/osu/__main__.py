"""`python -m benchmarks.osu`: see benchmarks.osu.cli."""

from benchmarks.osu.cli import console

console()
