"""Coverage-guided fuzzing of what peers and clients control (`python -m tools.fuzz`)."""
