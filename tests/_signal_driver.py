"""`limoe train --config CONFIG` with SIGNAL sent to TARGET (main | group) from inside PHASE, for
tests/train/test_train_signals.py. Phases: setup (before training starts), step (the 3rd forward), data (a loader
worker, then it stalls, so the trainer is waiting for data, while the other worker is still starting), eval (the
first evaluation; the config makes it periodic or final), decode (inside the decoding of an image during the
first evaluation). Two more phases send no signal: crash (the 3rd forward raises) and worker-dies (a loader
worker is killed, as by the kernel's out-of-memory killer).

usage: python _signal_driver.py SIGNAL TARGET PHASE CONFIG
"""

import os
import signal
import sys
import time

from torch.utils.data import get_worker_info

from limoe.cli import main
from limoe.data import loader, stream
from limoe.train import loop
from limoe.train import step as step_module

sig, target, phase, config = signal.Signals[sys.argv[1]], sys.argv[2], sys.argv[3], sys.argv[4]
# As from a terminal: a test run in the background (`pytest &`) hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
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


if phase == "crash":
    def crash(*args, **kwargs):
        crash.calls += 1
        if crash.calls == 3:
            raise RuntimeError("a bug in the third step")
        return real_losses(*args, **kwargs)

    crash.calls, real_losses = 0, step_module.compute_losses
    step_module.compute_losses = crash
elif phase == "setup":  # before the loop takes the signals over: while the tokenizer trains
    loop.make_tokenizer = once(loop.make_tokenizer)
elif phase == "step":
    step_module.compute_losses = once(step_module.compute_losses)
elif phase == "eval":
    loop.held_out = once(loop.held_out)
elif phase == "decode":
    from PIL import Image

    real_held_out, real_open, evaluating = loop.held_out, Image.open, []

    def marking_held_out(*args, **kwargs):
        evaluating.append(1)
        return real_held_out(*args, **kwargs)

    def signalling_open(*args, **kwargs):
        if evaluating == [1]:
            evaluating.append(1)
            send()  # the handler runs at the next bytecode: here, inside the decoder's `try`
        return real_open(*args, **kwargs)

    loop.held_out, Image.open = marking_held_out, signalling_open
elif phase in ("data", "worker-dies"):
    real_iter, real_init = stream.SampleStream.__iter__, loader.init_worker

    def stalling_iter(self):
        for i, item in enumerate(real_iter(self)):
            info = get_worker_info()
            if i == 2 and self.epoch == 1 and info is not None and info.id == 0:
                if phase == "worker-dies":
                    os.kill(os.getpid(), signal.SIGKILL)
                send()
                time.sleep(2)
            yield item

    def slow_init(parent_pid, worker_id):  # the group's signal reaches worker 1 before it is set up
        if worker_id == 1:
            time.sleep(1)
        real_init(parent_pid, worker_id)

    stream.SampleStream.__iter__, loader.init_worker = stalling_iter, slow_init

sys.exit(main(["train", "--config", config, "--no-progress"]))
