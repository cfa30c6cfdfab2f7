"""``python -m pipeline.stages.lora_adapter --spec spec.json``: the lora_adapter asset's child process."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.core.quick_exit import exit_now
from pipeline.stages.lora_adapter import ERROR_FILE, TrainSpec, train


def main(argv: list[str] | None = None, on_step=None) -> int:
    """``on_step(step)`` is called as each step ends: tests pass one that kills the process there."""
    ap = argparse.ArgumentParser(description="MedTune LoRA training (the lora_adapter asset's child process)")
    ap.add_argument("--spec", required=True, help="JSON file with the TrainSpec")
    args = ap.parse_args(argv)
    spec = TrainSpec.load(args.spec)
    error_file = Path(spec.checkpoint_dir) / ERROR_FILE
    error_file.unlink(missing_ok=True)
    try:
        train(spec, on_step)
    except Exception as exc:
        # the asset reads this and fails with the reason, not just "exited with code 1"
        if os.environ.get("RANK", "0") == "0":
            try:
                error_file.write_text(f"{type(exc).__name__}: {exc}")
            except OSError:
                pass
        raise
    return 0


if __name__ == "__main__":
    # a failure raises (its traceback printed, the ordinary exit); a success skips the interpreter's
    # teardown: the adapter is written and the result reported before main returns
    exit_now(main())
