"""The one exception type for mistakes a user can fix.

Library code raises `UserError`; only `cli.py` turns it into exit code 2 and a one-line message.
"""


class UserError(Exception):
    """A problem the user caused and can fix (bad config, missing file, absent device...).

    The message must name the field or file and say what to do.
    """


class TrainingDiverged(Exception):
    """The loss or gradient norm became non-finite; no update from that step was applied or saved (exit 1)."""

    def __init__(self, stage: str, step: int, loss: float, grad_norm: float, last_checkpoint) -> None:
        self.stage, self.step, self.loss, self.grad_norm, self.last_checkpoint = stage, step, loss, grad_norm, last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"{stage} training diverged at step {step}: loss={loss}, grad_norm={grad_norm} (non-finite); the update "
            f"was not applied; {where}. Lower the learning rates, enable {stage}.optimizer.grad_clip, or use float32"
        )
