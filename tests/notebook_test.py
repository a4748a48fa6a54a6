"""Executes the walkthrough notebook end to end (its cells assert what they show) and checks
that its text holds the derivation it exists for."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "kl_walkthrough.ipynb"

# The derivation from D_KL[Q(z|X) || P(z|X)] to the ELBO identity, the closed form and the
# misquoted form's minimiser, as the notebook's markdown writes them (whitespace aside).
DERIVATION = [
    # (0) the definition, (1) Bayes' rule inside the expectation, (3)-(4) log P(X) taken out,
    # (5) the identity.
    r"D_{\mathrm{KL}}[Q(z\mid X)\,\|\,P(z\mid X)] = \mathbb E_{z\sim Q}\big[\log Q(z\mid X)"
    r" - \log P(z\mid X)\big]",
    "Bayes' rule inside the expectation",
    r"\log P(z\mid X) = \log P(X\mid z) + \log P(z) - \log P(X)",
    r"\mathbb E_Q[\log P(X)] = \log P(X)",
    r"= D_{\mathrm{KL}}[Q(z\mid X)\,\|\,P(z)] - \mathbb E_{Q}\big[\log P(X\mid z)\big] + \log P(X)",
    r"\log P(X) = \mathrm{ELBO} + D_{\mathrm{KL}}[Q(z\mid X)\,\|\,P(z\mid X)]",
    # Which KL has a closed form, and why the other has none.
    r"**closed form**",
    r"**no closed form**",
    r"\log P(X) = \log \int P(X\mid z)\,P(z)\,dz",
    r"is the closed form of $D_{\mathrm{KL}}[Q(z\mid X)\,\|\,P(z)]$",
    # The closed form per dimension, step by step.
    r"\mathbb E_q[z^2] = \mathrm{Var}_q(z) + (\mathbb E_q z)^2 = \sigma^2 + \mu^2",
    r"= \tfrac12\big(\sigma^2 + \mu^2 - \log\sigma^2 - 1\big)",
    # The misquoted form and its minimiser.
    r"f'(\sigma) = 2\sigma - 1/\sigma = 0 \iff \sigma^2 = \tfrac12",
    r"g'(\sigma) = \sigma - 1/\sigma = 0 \iff \sigma = 1",
]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_walkthrough_notebook_executes(tmp_path):
    pytest.importorskip("nbconvert")
    pytest.importorskip("ipykernel")
    out = tmp_path / "executed.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
         "--ExecutePreprocessor.timeout=300", str(NOTEBOOK), "--output", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(NOTEBOOK.parents[1])})  # This checkout's vaekl.
    assert proc.returncode == 0, proc.stderr[-3000:]
    import nbformat

    executed = nbformat.read(out, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "TensorFlow imported: False; vaekl.train loaded: False" in text
    assert "misquoted at sigma = 0.70711" in text
    assert re.search(r"\(5\) log p\(x\) = (-?\d+\.\d+);  ELBO \+ KL\(q \|\| p\(z\|x\)\) = .* = \1",
                     text), text
    # The training cell: a partial config trained, its absl progress lines on stderr
    # (no app.run in a kernel), and a misspelt field refused by name.
    stderr = "".join(o.text for c in code for o in c.outputs
                     if o.output_type == "stream" and o.name == "stderr")
    assert re.search(r"train: \d+/\d+ steps", stderr), stderr
    assert "orbax" not in stderr
    assert re.search(r"test ELBO -\d+\.\d+ nats, IWAE-20 log-likelihood", text)
    assert "config.train.num_epoch: unknown field; did you mean 'num_epochs'?" in text
    # Every figure has axis labels and a title.
    sources = [c.source for c in code if "plt.figure" in c.source]
    assert sources
    for source in sources:
        for call in ("plt.xlabel(", "plt.ylabel(", "plt.title("):
            assert call in source, (call, source[:80])


def test_walkthrough_notebook_derives_the_elbo_identity():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    markdown = _squash("".join(c.source for c in notebook.cells if c.cell_type == "markdown"))
    missing = [step for step in DERIVATION if _squash(step) not in markdown]
    assert not missing, missing


def test_walkthrough_install_cell_installs_only_when_vaekl_is_missing():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c.source for c in notebook.cells if c.cell_type == "code")
    assert 'if importlib.util.find_spec("vaekl") is None:' in source
    assert '"pip", "install", "-e"' in source
    assert "<this repository>" not in "".join(c.source for c in notebook.cells)
