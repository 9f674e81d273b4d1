"""The README's main command, shortened: preprocess, 3D-parallel training, save, export, generate."""
import os
import re
import subprocess


def test_quickstart_end_to_end(tmp_path):
    env = dict(os.environ, SKIP_INSTALL="1", ITERS="20", OUT=str(tmp_path / "qs"))
    out = subprocess.run(["bash", "examples/quickstart_cpu.sh"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| lm loss: (\S+) \|", out.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, losses
    assert "world 8 = tp 2 x pp 2 x dp 2" in out.stdout
    assert os.path.exists(tmp_path / "qs" / "hf" / "config.json")
    # slimtron's greedy continuation (printed by tools/generate.py) equals transformers' one on
    # the exported model
    hf_line = next(l for l in out.stdout.splitlines() if l.startswith("transformers: "))
    continuation = hf_line[len("transformers: "):].strip()
    assert len(continuation) > 10
    assert continuation in out.stdout.replace(hf_line, "")
