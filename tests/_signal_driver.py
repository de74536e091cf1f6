"""`limoe train --config CONFIG` with SIGNAL sent to TARGET (main | group) from inside PHASE, for
tests/test_train_signals.py. Phases: step (the 3rd forward), data (a loader worker, then it stalls, so the
trainer is waiting for data), eval (the first evaluation; the config makes it periodic or final).

usage: python _signal_driver.py SIGNAL TARGET PHASE CONFIG
"""

import os
import signal
import sys
import time

from torch.utils.data import get_worker_info

from limoe.cli import main
from limoe.data import stream
from limoe.train import loop

sig, target, phase, config = signal.Signals[sys.argv[1]], sys.argv[2], sys.argv[3], sys.argv[4]
trainer = os.getpid()


def send() -> None:
    if target == "group":
        os.killpg(os.getpgid(0), sig)
    else:
        os.kill(trainer, sig)


def once(real):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == (3 if phase == "step" else 1):
            send()
        return real(*args, **kwargs)

    return wrapped


if phase == "step":
    loop.compute_losses = once(loop.compute_losses)
elif phase == "eval":
    loop.held_out = once(loop.held_out)
elif phase == "data":
    real_iter = stream.SampleStream.__iter__

    def stalling_iter(self):
        for i, item in enumerate(real_iter(self)):
            info = get_worker_info()
            if i == 2 and self.epoch == 1 and info is not None and info.id == 0:
                send()
                time.sleep(2)
            yield item

    stream.SampleStream.__iter__ = stalling_iter

sys.exit(main(["train", "--config", config, "--no-progress"]))
