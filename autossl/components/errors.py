"""The training stages' errors (trainer, pre-trainer): bad input or state, reported with what is
wrong (the CLI prints it)."""


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to run."""


class TrainingInterrupted(SystemExit):
    """SIGTERM or SIGINT stopped training between two steps, after ``checkpoint_latest.pth`` was
    written: ``--c`` continues from it. As an uncaught exception it ends the process with status
    128 + the signal number (143 for SIGTERM, 130 for SIGINT), like a process killed by the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message
