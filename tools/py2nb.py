"""Write a notebook (no outputs) from a percent-format script: a developer tool for authoring.

Cells start with ``# %%`` (code), ``# %% [markdown]`` (markdown, each line prefixed ``# ``) or
``# %% tags=["parameters"]`` (a tagged code cell). Usage: ``python tools/py2nb.py SRC.py OUT.ipynb``.
"""
import json
import re
import sys

import nbformat


def convert(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for block in re.split(r"^# %%", src, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in head:
            text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cell = nbformat.v4.new_code_cell(body)
            m = re.search(r"tags=(\[.*?\])", head)
            if m:
                cell.metadata["tags"] = json.loads(m.group(1))
            nb.cells.append(cell)
    return nb


if __name__ == "__main__":
    nbformat.write(convert(open(sys.argv[1]).read()), sys.argv[2])
