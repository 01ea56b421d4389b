"""The README's Python examples run as written.

Each ```python block of README.md is executed in one namespace, in order, after a prelude
that defines the names the examples leave to the reader (``xs``, ``ys``, ``batches``,
``images_uint8`` and the ``.pth`` file); the blocks' results are then checked.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S)
            if lang == "python"]


def test_readme_has_the_examples_this_test_expects():
    blocks = python_blocks()
    assert len(blocks) == 4
    assert "affjax.affinity_score(x, y)" in blocks[0]
    assert "affjax.signature(model, variables, x)" in blocks[1]
    assert "models.from_torchvision(" in blocks[2]
    assert "regularizers.output_and_scores(" in blocks[3]


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    import torch  # the test extra installs torch and torchvision (README's block reads a .pth)
    import torchvision
    monkeypatch.chdir(tmp_path)
    # The file name the README uses for torchvision's download; random weights here.
    torch.save(torchvision.models.resnet18().state_dict(), "resnet18-f37072fd.pth")
    # Users mostly run without float64 (conftest.py turns it on): the README's way.
    with jax.enable_x64(False):
        _run_and_check(capsys)


def _run_and_check(capsys):
    keys = jax.random.split(jax.random.key(5), 3)
    ns = {
        "xs": jax.random.normal(keys[0], (3, 256, 16), jnp.float32),
        "batches": [jax.random.normal(k, (128, 32), jnp.float32) for k in keys[1:]],
        "images_uint8": np.random.default_rng(0).integers(0, 256, (4, 240, 260, 3), np.uint8),
    }
    ns["ys"] = jax.nn.relu(ns["xs"])
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), ns)
    printed = capsys.readouterr().out

    # The score block.
    assert ns["r"].score.dtype == jnp.float32 and 0.0 < float(ns["r"].score) < 1.0
    # The signature block: 3 activation calls, in forward order, the table printed.
    assert ns["scores"].shape == (3,)
    for name in ("Activation_0:0", "gelu:0", "Activation_0:1"):
        assert name in printed
    # The model-zoo block: ImageNet logits, one score per ReLU call of resnet18.
    assert ns["x"].shape == (4, 224, 224, 3) and ns["logits"].shape == (4, 1000)
    assert len(ns["sig"]) == 17 and ns["sig"].names[-1] == "layer4.1/relu:1"
    # The regularizer block defines a working training step (on the signature block's MLP).
    mlp = ns["MLP"]()
    x = ns["batches"][0]
    params = mlp.init(jax.random.key(1), x)["params"]
    ns["model"] = mlp
    labels = jnp.arange(x.shape[0]) % 10
    params, opt_state, loss = ns["step"](params, ns["optimizer"].init(params), x, labels)
    _, _, loss2 = ns["step"](params, opt_state, x, labels)
    assert np.isfinite(float(loss)) and float(loss2) < float(loss)
