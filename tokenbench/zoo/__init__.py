"""The embedded default model(s): training code and small checkpoints shipped as package data."""
