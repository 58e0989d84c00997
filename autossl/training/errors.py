"""The trainer's error: bad input or state, reported with what is wrong (the CLI prints it)."""


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to run."""
