"""How many trials per strategy fit the GPU call's quality part, from its speed part's figures.

``scripts/gpu_check.sh --with-quality`` runs the speed checks first; they print the median
seconds of a 1-epoch trial and the fine-tuning throughput of an FGA ResNet-56. The quality part
then runs 4 searches (ResNet-56 and VGG-16, ``uniform`` and ``search``) of N trials each and two
final fine-tunes of ``--final-epochs`` epochs, within its time limit. This prints the largest N
(between 3 and 8) that the estimate below fits in that limit, or 8 when the figures are missing:

    time = 4 runs x (N trials x trial seconds + RUN_OVERHEAD_S)
           + 2 models x final epochs x 50,000 images x FINAL_COST / FGA images per second

RUN_OVERHEAD_S is an estimate of a run's set-up (model, space, spectra, baseline, teacher cache).
FINAL_COST is the final fine-tune's time per image against a trial's, per model on average: the
teacher runs on every batch (random crops make cached logits useless) and its batch is 128 against
the trials' 512 (more steps, each less able to fill the GPU). It was 2.0, a guess, until the H200
call at 5261652 measured it: ResNet-56's 15 epochs took 261 s (2,874 img/s against the trials'
16,829: 5.9) and VGG-16's ran at about 5 s an epoch (1.5), so the two cost 3.7 on average, and
the guess left the VGG-16 fine-tune cut by the time limit halfway.

    python scripts/gpu_fit_trials.py SPEED_TXT SECONDS [--final-epochs 15]
"""

from __future__ import annotations

import argparse
import math
import re
import sys

RUNS = 4  # ResNet-56 and VGG-16, uniform and search
MODELS = 2  # final fine-tunes
IMAGES = 50_000  # the final fine-tune's training images (train + validation)
RUN_OVERHEAD_S = 15.0
FINAL_COST = 4.0  # the final fine-tunes' time per image relative to a trial's (H200, 5261652: 3.7)
MOST, LEAST = 8, 3


def fit_trials(speed: str, *, seconds: float, final_epochs: float = 15.0) -> tuple[int, str]:
    """The trial count and a line saying how it was chosen."""
    trial = re.search(r"seconds per 1-epoch trial: median ([\d.]+) s", speed)
    rate = re.search(r"FGA 0\.2 .*fga-search loop on CIFAR-10 +(\d+) img/s", speed)
    if trial is None or rate is None or float(rate.group(1)) <= 0:
        return MOST, f"{MOST} trials per strategy (the speed part's figures are missing)"
    per_trial = float(trial.group(1))
    finals = MODELS * final_epochs * IMAGES * FINAL_COST / float(rate.group(1))
    left = seconds - finals - RUNS * RUN_OVERHEAD_S
    n = max(LEAST, min(MOST, math.floor(left / (RUNS * per_trial))))
    return n, (
        f"{n} trials per strategy: {seconds:.0f} s - final fine-tunes ~{finals:.0f} s - set-ups ~{RUNS * RUN_OVERHEAD_S:.0f} s "
        f"leaves {left:.0f} s for {RUNS} runs of {per_trial:.2f} s trials (kept within {LEAST}-{MOST})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("speed", help="the speed part's output (speed.txt)")
    parser.add_argument("seconds", type=float, help="the quality part's time limit")
    parser.add_argument("--final-epochs", type=float, default=15.0)
    args = parser.parse_args()
    try:
        with open(args.speed) as f:
            text = f.read()
    except OSError:
        text = ""
    n, why = fit_trials(text, seconds=args.seconds, final_epochs=args.final_epochs)
    print(n)
    print(why, file=sys.stderr)


if __name__ == "__main__":
    main()
