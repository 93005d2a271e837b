"""The README's Python examples run as written, and the values their comments quote are what the calls return."""

from __future__ import annotations

import ast
import math
import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks() -> list[str]:
    with open(README) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def _namespace() -> dict:
    """What the examples take as given (named in their comments): views, paired features, MoCo's queries and keys
    with an optimizer, a labelled training and test set, and encoders with their inputs."""
    g = torch.Generator().manual_seed(0)
    n, d, classes = 240, 8, 4
    centres = 3 * torch.randn(classes, d, generator=g)
    labels = torch.arange(n) % classes
    y_test = torch.arange(n // 2) % classes
    q = torch.randn(16, 128, generator=g, requires_grad=True)
    return {
        "z1": torch.randn(32, 16, generator=g, requires_grad=True),
        "z2": torch.randn(32, 16, generator=g, requires_grad=True),
        "image_features": torch.randn(32, 16, generator=g, requires_grad=True),
        "text_features": torch.randn(32, 16, generator=g, requires_grad=True),
        "q": q,
        "k": torch.randn(16, 128, generator=g),
        "opt": torch.optim.SGD([q], lr=0.1),
        "features": centres[labels] + torch.randn(n, d, generator=g),
        "labels": labels,
        "f_test": centres[y_test] + torch.randn(n // 2, d, generator=g),
        "y_test": y_test,
        # gradient caching: encoders and their inputs
        "encoder": torch.nn.Linear(16, 8),
        "x1": torch.randn(32, 16, generator=g),
        "x2": torch.randn(32, 16, generator=g),
        "image_tower": torch.nn.Linear(16, 8),
        "text_tower": torch.nn.EmbeddingBag(100, 8, mode="mean"),
        "images": torch.randn(32, 16, generator=g),
        "tokens": torch.randint(0, 100, (32, 12), generator=g),
        "query_encoder": torch.nn.Linear(16, 128),
        "x_q": torch.randn(16, 16, generator=g),
    }


def test_readme_has_the_examples():
    blocks = _blocks()
    assert len(blocks) >= 10, len(blocks)
    for call in ("info_nce(", "nt_xent(", "clip_loss(", "NegativeQueue(", "gap_report(", "delta_upper("):
        assert any(call in b for b in blocks), call


def test_readme_examples_run(capsys):
    ns = _namespace()
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        except Exception as exc:  # noqa: BLE001 - name the block
            pytest.fail(f"README python block {i} raised {type(exc).__name__}: {exc}\n{block}")
    loss = ns["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert "R_cont" in capsys.readouterr().out  # format_gap_report's table was printed


def test_readme_quoted_values():
    # Lines `expression  # value ...`: the value, to the digits the comment shows.
    ns = _namespace()
    checked = 0
    for block in _blocks():
        exec(compile(block, "README.md", "exec"), ns)
        for line in block.splitlines():
            m = re.match(r"^(?P<expr>[^#]+?)\s+#\s+(?P<value>-?\d+\.\d+)\b", line)
            if m is None:
                continue
            try:  # an expression, not a statement
                ast.parse(m["expr"], mode="eval")
            except SyntaxError:
                continue
            got = float(eval(m["expr"], ns))
            digits = len(m["value"].split(".")[1])
            assert math.isclose(round(got, digits), float(m["value"]), abs_tol=10.0**-digits / 2), (line, got)
            checked += 1
    assert checked >= 2, checked


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    # The contents line and the at-a-glance table link to sections (#anchors) and to files: each must exist.
    with open(README) as fh:
        text = fh.read()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)"></a>', prose))
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert sum(link.startswith("#") for link in local) >= 10, local
    root = os.path.dirname(README)
    for link in local:
        if link.startswith("#"):
            assert link[1:] in anchors, (link, sorted(anchors))
        else:
            assert os.path.exists(os.path.join(root, link.split("#")[0])), link
