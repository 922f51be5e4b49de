"""The book's machinery, apart from the science: the run directory by which notebooks pass results
(:mod:`~vstain.book.rundir`), the pipeline from profiles through papermill to jupyter-book
(:mod:`~vstain.book.pipeline`) and the headless-browser check of the built HTML
(:mod:`~vstain.book.browser`). The science modules never import this package."""
