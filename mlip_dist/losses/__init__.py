"""MLIP losses (METHOD.md, Losses 1-4). Pure modules told their distributed setting."""
